//! Keeping the CA's CRLs fresh for file consumers (nginx `ssl_crl`, haproxy `crl-file`) and
//! Workload API clients: the CRLs are fetched again at about half of their remaining validity
//! (so they never pass `nextUpdate` while the CA is reachable) and within a few seconds of a
//! new revocation seen on the agent's `Revocation.Watch` — only then: the revision the watch
//! reports says when the CRL changed, so nothing is polled. A burst of revocations costs a few
//! fetches, not one each: fetches are at least [`MIN_GAP`] apart. A fetch for a revocation
//! waits [`SETTLE`] and then a random part of [`SPREAD`]: a whole fleet learns of a revocation
//! within milliseconds, and `GetCrl` from every agent at once would compete with the push
//! itself for the CA's CPU (10,000 agents: the push took over 3 s at p99 with fetches spread
//! over the first 500 ms). The revocation is in force in the agent (its revocation set, the
//! Workload API's peers) from the push, before any CRL is fetched. Fetches ride the agent's one
//! connection to the CA ([`super::link`]).

use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::CertificateRevocationListDer;
use rustls_pki_types::pem::PemObject;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, error, warn};
use x509_parser::prelude::FromDer;
use x509_parser::revocation_list::CertificateRevocationList;

use super::link::CaLink;
use super::timing::{Backoff, refresh_in};
use crate::pb::v1 as pb;
use crate::tls::{RevocationSet, unix_now};

/// Least time between two CRL fetches: a burst of revocations is coalesced into one fetch per
/// gap (plus one for what arrived during the last).
pub(crate) const MIN_GAP: Duration = Duration::from_millis(250);
/// A fetch for a new revocation waits this first, so the CA pushes the revocation to the whole
/// fleet before agents ask for the CRL.
pub(crate) const SETTLE: Duration = Duration::from_secs(1);
/// ... and then a random part of this: 10,000 agents learn of a revocation within milliseconds
/// of each other, and their `GetCrl` calls are spread (5,000 a second) instead of queued at once.
pub(crate) const SPREAD: Duration = Duration::from_secs(2);
/// Earliest refresh after a successful fetch, whatever the CRL says (a CA configured with a
/// validity of a second must not make the agent spin).
const MIN_REFRESH: Duration = Duration::from_millis(500);
/// Refresh interval for a CRL without `nextUpdate` (not one Lanyard signs).
const NO_NEXT_UPDATE_REFRESH: Duration = Duration::from_secs(60);
/// How long one `GetCrl` call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a set of CRLs from the CA was not taken.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum CrlError {
    /// The CA could not be reached or refused the call.
    #[error("{0}")]
    Call(String),
    /// A CRL from the CA does not parse as X.509 DER.
    #[error("the CA sent a CRL that does not parse")]
    Malformed,
}

/// The earliest `nextUpdate` (seconds since the epoch) of `crls`; `Ok(None)` when none carries
/// one, `Err` when one does not parse.
pub(crate) fn next_update(crls: &[Vec<u8>]) -> Result<Option<i64>, CrlError> {
    let mut earliest: Option<i64> = None;
    for der in crls {
        let (_, crl) = CertificateRevocationList::from_der(der).map_err(|_| CrlError::Malformed)?;
        if let Some(t) = crl.next_update() {
            let t = t.timestamp();
            earliest = Some(earliest.map_or(t, |e| e.min(t)));
        }
    }
    Ok(earliest)
}

/// What serials a set of CRLs lists, in a few bytes: how many, and an order-independent digest
/// of them. A CA with a million revocations sends a 36 MB CRL; the agent compares each one it
/// fetches with the one in hand to tell a routine refresh from news, and a set of a million
/// serials (one `Vec` each, twice) cost it ~100 MB per comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RevokedSerials {
    count: usize,
    /// Wrapping sum of each serial's hash (SipHash with fixed keys: the same in every run).
    digest: u64,
}

impl RevokedSerials {
    /// How many serials (with repeats: a serial listed by two CRLs counts twice).
    pub(crate) fn len(&self) -> usize {
        self.count
    }
}

/// The serials `crls` list; CRLs that do not parse contribute none.
pub(crate) fn revoked_serials(crls: &[Vec<u8>]) -> RevokedSerials {
    use std::hash::{Hash, Hasher};
    let mut set = RevokedSerials {
        count: 0,
        digest: 0,
    };
    for der in crls {
        let Ok((_, crl)) = CertificateRevocationList::from_der(der) else {
            continue;
        };
        for r in crl.iter_revoked_certificates() {
            #[allow(
                deprecated,
                reason = "a fixed-key SipHash: a digest, not a hash table's"
            )]
            let mut h = std::hash::SipHasher::new();
            r.raw_serial().hash(&mut h);
            set.count += 1;
            set.digest = set.digest.wrapping_add(h.finish());
        }
    }
    set
}

/// `crls` as concatenated PEM (`X509 CRL` blocks), the form `crl.pem` holds.
pub(crate) fn to_pem(crls: &[Vec<u8>]) -> String {
    crls.iter()
        .map(|der| crate::ca::pem_encode("X509 CRL", der))
        .collect()
}

/// The CRLs in a PEM file (unparseable blocks end the list).
pub(crate) fn from_pem(pem: &[u8]) -> Vec<Vec<u8>> {
    CertificateRevocationListDer::pem_slice_iter(pem)
        .map_while(Result::ok)
        .map(|c| c.as_ref().to_vec())
        .collect()
}

/// When to fetch again after CRLs with `next_update_s` were fetched at `fetched_ms`: half of
/// the remaining validity, ±10 % jitter, at least [`MIN_REFRESH`].
pub(crate) fn refresh_after(fetched_ms: i64, next_update_s: Option<i64>, jitter: f64) -> Duration {
    match next_update_s {
        Some(n) => {
            refresh_in(fetched_ms, fetched_ms, n.saturating_mul(1000), 0.5, jitter).max(MIN_REFRESH)
        }
        None => NO_NEXT_UPDATE_REFRESH,
    }
}

/// Follows the CA's CRLs at `server` (see the module docs), starting from `seed` (the CRLs the
/// agent already holds; empty: fetch at once). The latest CRLs are in the returned receiver.
/// Runs until the returned task is aborted.
pub(crate) fn follow_crls(
    link: Arc<CaLink>,
    revocations: Arc<RevocationSet>,
    seed: Vec<Vec<u8>>,
    max_backoff: Duration,
) -> (tokio::task::JoinHandle<()>, watch::Receiver<Vec<Vec<u8>>>) {
    let (tx, rx) = watch::channel(seed.clone());
    let task = tokio::spawn(async move {
        let fetcher = Fetcher { link };
        let mut news = revocations.changes();
        let mut backoff = Backoff::new(Duration::from_secs(1), max_backoff);
        let mut last_failure: Option<String> = None;
        // What the CRLs in hand cover: the revocation set's revision when they were asked for.
        let mut covered = revocations.rev();
        let mut held_until = next_update(&seed).ok().flatten();
        // Nothing in hand, or nothing usable (a damaged crl.pem read back at start): fetch now.
        let mut next = match next_update(&seed) {
            Ok(Some(until)) if !seed.is_empty() => {
                Instant::now() + refresh_after(now_ms(), Some(until), jitter())
            }
            _ => Instant::now(),
        };
        let mut last_fetch: Option<Instant> = None;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(next) => {}
                Ok(()) = news.changed() => {
                    // While the CA fails, retries follow the backoff, not the revocations.
                    if revocations.rev() <= covered || last_failure.is_some() {
                        continue;
                    }
                    // New revocations: fetch soon (spread), no sooner than the gap allows.
                    let spread = SETTLE + SPREAD.mul_f64(rand::random::<f64>());
                    let earliest = last_fetch.map_or_else(Instant::now, |t| t + MIN_GAP);
                    next = next.min(earliest.max(Instant::now()) + spread);
                    continue;
                }
            }
            let asked_at = revocations.rev();
            last_fetch = Some(Instant::now());
            match fetcher.fetch().await {
                Ok((crls, until)) => {
                    if last_failure.take().is_some() {
                        debug!("CRLs fetched again");
                    }
                    backoff.reset();
                    covered = asked_at;
                    held_until = until;
                    next = Instant::now() + refresh_after(now_ms(), until, jitter());
                    tx.send_if_modified(|cur| {
                        let changed = *cur != crls;
                        if changed {
                            *cur = crls;
                        }
                        changed
                    });
                }
                Err(e) => {
                    let msg = e.to_string();
                    let left = held_until.map(|t| t - unix_now());
                    match left {
                        Some(left) if left <= 0 => {
                            error!(error = %msg, expired_s_ago = -left, "CRL refresh failing; the CRLs in hand have expired");
                        }
                        _ if last_failure.as_deref() != Some(msg.as_str()) => {
                            warn!(error = %msg, expires_in_s = ?left, "CRL refresh failed; retrying with backoff");
                        }
                        _ => debug!(error = %msg, "CRL refresh retry failed"),
                    }
                    last_failure = Some(msg);
                    // Retry sooner than the backoff would while the CRLs in hand run out.
                    let mut wait = backoff.next_wait();
                    if let Some(left) = left.filter(|l| *l > 0) {
                        wait = wait.min(Duration::from_millis(left as u64 * 250).max(MIN_GAP));
                    }
                    next = Instant::now() + wait;
                }
            }
        }
    });
    (task, rx)
}

/// `GetCrl` over the agent's link.
struct Fetcher {
    link: Arc<CaLink>,
}

// === impl Fetcher ===

impl Fetcher {
    /// The CA's CRLs (the signing CA's, then a retiring one's) and their earliest nextUpdate.
    async fn fetch(&self) -> Result<(Vec<Vec<u8>>, Option<i64>), CrlError> {
        let (channel, generation) = tokio::time::timeout(CALL_TIMEOUT, self.link.checkout())
            .await
            .map_err(|_| CrlError::Call("connecting to the CA timed out".into()))?
            .map_err(|e| CrlError::Call(e.to_string()))?;
        let mut client = crate::client::crl_client(channel);
        let call = client.get_crl(pb::GetCrlRequest {});
        let answer = match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(s)) => {
                if s.code() == tonic::Code::Unauthenticated {
                    self.link.refused(generation);
                }
                return Err(CrlError::Call(format!("{:?}: {}", s.code(), s.message())));
            }
            Err(_) => return Err(CrlError::Call("GetCrl timed out".into())),
        };
        let crls: Vec<Vec<u8>> = std::iter::once(answer.der)
            .chain(answer.retiring)
            .filter(|d| !d.is_empty())
            .collect();
        if crls.is_empty() {
            return Err(CrlError::Malformed);
        }
        let until = next_update(&crls)?;
        Ok((crls, until))
    }
}

fn jitter() -> f64 {
    rand::random::<f64>() * 2.0 - 1.0
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn refreshes_at_half_the_remaining_validity_never_sooner_than_the_floor() {
        let ms = Duration::from_millis;
        // Fetched at t=100 s, valid until 400 s: refresh at 150 s ± 30 s.
        assert_eq!(refresh_after(100_000, Some(400), 0.0), ms(150_000));
        assert_eq!(refresh_after(100_000, Some(400), 1.0), ms(180_000));
        assert_eq!(refresh_after(100_000, Some(400), -1.0), ms(120_000));
        // A few seconds of validity: still before nextUpdate.
        assert_eq!(refresh_after(100_000, Some(104), 0.0), ms(2_000));
        // Already expired, or about to: the floor keeps the loop from spinning.
        assert_eq!(refresh_after(100_000, Some(99), 0.0), MIN_REFRESH);
        assert_eq!(refresh_after(100_000, None, 0.0), NO_NEXT_UPDATE_REFRESH);
    }

    #[test]
    fn crls_round_trip_through_pem_and_give_the_earliest_next_update() {
        let dir = tempfile::tempdir().unwrap();
        let td = crate::spiffe::TrustDomain::new("example.org").unwrap();
        let ca = crate::ca::Authority::load_or_create(dir.path(), &td, Default::default()).unwrap();
        let serial = crate::ca::Serial::from_bytes(&[0x42, 1]);
        let a = ca.sign_crl(&[(serial, 1_000)], 1, 1_000, 5_000).unwrap();
        let b = ca.sign_crl(&[], 2, 1_000, 3_000).unwrap();
        let pem = to_pem(&[a.clone(), b.clone()]);
        assert_eq!(pem.matches("-----BEGIN X509 CRL-----").count(), 2);
        assert_eq!(from_pem(pem.as_bytes()), vec![a.clone(), b.clone()]);
        assert_eq!(next_update(&[a.clone(), b.clone()]).unwrap(), Some(3_000));
        assert_eq!(
            revoked_serials(&[a.clone(), b.clone()]),
            revoked_serials(&[b.clone(), a.clone()])
        );
        assert_eq!(revoked_serials(&[a.clone(), b.clone()]).len(), 1);
        assert_ne!(
            revoked_serials(std::slice::from_ref(&a)),
            revoked_serials(std::slice::from_ref(&b))
        );
        // Another serial, same count: told apart.
        let other = crate::ca::Serial::from_bytes(&[0x42, 2]);
        let c = ca.sign_crl(&[(other, 1_000)], 3, 1_000, 5_000).unwrap();
        assert_eq!(revoked_serials(std::slice::from_ref(&c)).len(), 1);
        assert_ne!(
            revoked_serials(std::slice::from_ref(&a)),
            revoked_serials(&[c])
        );
        assert!(next_update(&[a[..a.len() - 1].to_vec()]).is_err());
        assert!(from_pem(b"not pem").is_empty());
    }
}
