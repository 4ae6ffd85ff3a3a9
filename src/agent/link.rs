//! The agent's one connection to the CA. Renewals, `GetCrl`, `Check` and both watch streams
//! (revocations, bundles) are multiplexed over one HTTP/2 connection, kept across rotations, so
//! a connected agent costs the CA one TLS session and two idle streams, and a rotation costs it
//! one RPC instead of a TLS handshake.
//!
//! **How a rotated certificate takes over.** The renewal RPC runs on the open connection (its
//! certificate proves the identity, the CSR proves the new key). A CA that binds what it issues
//! to the connection it issued over (design decision 65) says so in the response
//! ([`CONNECTION_BOUND`]); from then on the connection speaks for the new certificate and is
//! kept, rotation after rotation, with no handshake. A CA that does not say so authenticates
//! every call by the certificate the connection was opened with, so the connection is opened
//! again with the newest certificate when the one it speaks for is about to expire (less than
//! [`margin`] left, judged whenever a call needs the channel). Either way it is opened again
//! when the trust bundle changed, when the CA refused a call as unauthenticated (see
//! [`CaLink::refused`]), or on the next natural reconnect (tonic's channel reconnects by itself,
//! presenting the slot's current certificate). Streams then move to the new connection and
//! resume from their revision, and the old connection closes once nothing uses it. A connection
//! never carries a call for an expired certificate while a fresher one is in hand, and revoking
//! the certificate it speaks for (or its identity) refuses every later call on it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use tokio::sync::watch;
use tonic::transport::Channel;
use tracing::{debug, info};

use super::timing::Backoff;
use crate::api::auth::CONNECTION_BOUND;
use crate::ca::SvidInfo;
use crate::client::{ClientError, connect};
use crate::tls::{RevocationSet, ServerTrust, TlsSource, unix_now};

/// How long before the connection's certificate expires the connection is opened again: a
/// tenth of the certificate's lifetime, at least 5 s (a call must not race the expiry).
pub(crate) fn margin(lifetime_s: i64) -> i64 {
    (lifetime_s / 10).max(5)
}

/// One agent's connection to the CA (see the module docs).
pub(crate) struct CaLink {
    servers: String,
    source: Arc<TlsSource>,
    /// What the agent knows is revoked: a connection whose certificate is revoked, or one that
    /// speaks for an older certificate while the current one is revoked, is opened again.
    revocations: Arc<RevocationSet>,
    open: Mutex<Option<Open>>,
    /// Only one caller opens a connection at a time; the others then take it.
    opening: tokio::sync::Mutex<()>,
    /// The generation of the open connection: streams move when it changes.
    generation: watch::Sender<u64>,
}

#[derive(Clone)]
struct Open {
    channel: Channel,
    /// Which opening of the link this is (the value [`CaLink::generations`] follows).
    generation: u64,
    /// The bundle the CA was verified against.
    bundle: Vec<CertificateDer<'static>>,
    /// The certificate the connection speaks for: the one it presented, or the newest the CA
    /// bound to it (None: none).
    cert: Option<SvidInfo>,
}

// === impl CaLink ===

impl CaLink {
    /// A link to the CA at `servers` (one address or several, comma-separated) authenticating
    /// with `source`'s credential; nothing is connected until a call needs it.
    pub(crate) fn new(
        servers: String,
        source: Arc<TlsSource>,
        revocations: Arc<RevocationSet>,
    ) -> Arc<Self> {
        Arc::new(Self {
            servers,
            source,
            revocations,
            open: Mutex::new(None),
            opening: tokio::sync::Mutex::new(()),
            generation: watch::channel(0).0,
        })
    }

    /// The channel to the CA, opened again first when the one in hand can no longer speak for
    /// the current credential (see the module docs).
    pub(crate) async fn channel(&self) -> Result<Channel, ClientError> {
        self.checkout().await.map(|(channel, _)| channel)
    }

    /// [`CaLink::channel`] and the generation of the connection it is, for
    /// [`CaLink::renewed`] and [`CaLink::refused`].
    pub(crate) async fn checkout(&self) -> Result<(Channel, u64), ClientError> {
        if let Some(open) = self.usable() {
            return Ok(open);
        }
        let _one = self.opening.lock().await;
        if let Some(open) = self.usable() {
            return Ok(open);
        }
        let bundle = self.source.bundle();
        let svid = self.source.svid();
        let channel = connect(
            &self.servers,
            ServerTrust::Bundle((*bundle).clone()),
            Some(self.source.slot()),
            self.source.oid().clone(),
        )
        .await?;
        let generation = *self.generation.borrow() + 1;
        let reopened = self
            .lock()
            .replace(Open {
                channel: channel.clone(),
                generation,
                bundle: bundle.certs().to_vec(),
                cert: svid.clone(),
            })
            .is_some();
        if reopened {
            debug!(serial = ?svid.map(|s| s.serial.to_hex()), "CA connection opened again with the current certificate");
        }
        self.generation.send_replace(generation);
        Ok((channel, generation))
    }

    /// Takes a renewal's answer on connection `generation`: when the CA bound the new
    /// certificate `svid` to that connection ([`CONNECTION_BOUND`] names its serial), the
    /// connection speaks for it from now on and is kept.
    pub(crate) fn renewed(
        &self,
        generation: u64,
        metadata: &tonic::metadata::MetadataMap,
        svid: &SvidInfo,
    ) {
        let bound = metadata
            .get(CONNECTION_BOUND)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|serial| serial.eq_ignore_ascii_case(&svid.serial.to_hex()));
        if !bound {
            return;
        }
        if let Some(open) = self.lock().as_mut().filter(|o| o.generation == generation) {
            debug!(serial = %svid.serial, "the CA bound the renewed certificate to the connection");
            open.cert = Some(svid.clone());
        }
    }

    /// The CA refused a call on connection `generation` as unauthenticated: whatever the agent
    /// believed the connection speaks for, the CA does not agree (say, tonic reconnected it
    /// with an older certificate before the new one was installed), so the next call opens it
    /// again with the current certificate.
    pub(crate) fn refused(&self, generation: u64) {
        let mut open = self.lock();
        if open.as_ref().is_some_and(|o| o.generation == generation) {
            debug!("the CA refused the connection's certificate; opening it again");
            *open = None;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Open>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn usable(&self) -> Option<(Channel, u64)> {
        let open = self.lock();
        let open = open.as_ref()?;
        let fresh = match (&open.cert, self.source.svid()) {
            // Opened with the current certificate: nothing fresher is in hand, so opening again
            // would present the same certificate (and, near its expiry, do so on every call
            // until the renewal lands). The CA judges it: renewal within the grace, or refusal.
            (Some(conn), Some(current)) if conn.serial == current.serial => true,
            (Some(conn), Some(current)) => {
                let life = conn.not_after - conn.not_before;
                conn.not_after - margin(life) > unix_now()
                    // Revoked: the CA refuses every call on it; the current one may be fine.
                    && self.revocations.check(conn).is_none()
                    // The current certificate is revoked: the CA must judge it, not an older
                    // one (a renewal after a renewable revocation, or a refusal).
                    && self.revocations.check(&current).is_none()
            }
            // Opened before there was a credential: open again with it.
            (None, Some(_)) => false,
            (_, None) => true,
        };
        (fresh && self.source.bundle().certs() == open.bundle.as_slice())
            .then(|| (open.channel.clone(), open.generation))
    }

    /// Follows the generation of the open connection.
    pub(crate) fn generations(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }
}

/// Runs the stream `once` opens on the link's channel again and again: at once when the link
/// moves to a new connection (the stream resumes there), with backoff from 200 ms to 10 s after
/// a failure. `once` returning `Unimplemented` ends the task (a CA without that RPC). Runs until
/// the returned task is aborted.
pub(crate) fn follow<F, Fut>(
    link: Arc<CaLink>,
    what: &'static str,
    mut once: F,
) -> tokio::task::JoinHandle<()>
where
    F: FnMut(Channel) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), tonic::Status>> + Send,
{
    tokio::spawn(async move {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        let mut generations = link.generations();
        let mut last_error: Option<String> = None;
        loop {
            let outcome = match link.checkout().await {
                Ok((channel, generation)) => {
                    generations.borrow_and_update();
                    let r = tokio::select! {
                        r = once(channel) => Some(r),
                        _ = generations.changed() => None,
                    };
                    if let Some(Err(s)) = &r
                        && s.code() == tonic::Code::Unauthenticated
                    {
                        link.refused(generation);
                    }
                    r
                }
                Err(e) => Some(Err(tonic::Status::unavailable(e.to_string()))),
            };
            match outcome {
                // Moved to a new connection: resume there now.
                None => continue,
                Some(Ok(())) => backoff.reset(),
                Some(Err(s)) if s.code() == tonic::Code::Unimplemented => {
                    info!(stream = what, "the CA does not offer this stream");
                    return;
                }
                Some(Err(s)) => {
                    let msg = s.message().to_string();
                    if last_error.as_deref() != Some(msg.as_str()) {
                        debug!(stream = what, code = ?s.code(), error = %msg, "CA stream interrupted");
                    }
                    last_error = Some(msg);
                }
            }
            tokio::time::sleep(backoff.next_wait()).await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_margin_is_a_tenth_of_the_lifetime_and_never_under_five_seconds() {
        assert_eq!(margin(300), 30);
        assert_eq!(margin(30), 5);
        assert_eq!(margin(0), 5);
    }
}
