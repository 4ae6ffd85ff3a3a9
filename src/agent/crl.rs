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

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::bytes::Bytes;
use rustls_pki_types::CertificateRevocationListDer;
use rustls_pki_types::pem::PemObject;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, error, warn};

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

/// The CA's CRLs (DER) as the agent holds them: the signing CA's, then a retiring CA's during a
/// rotation; empty until fetched. One copy, shared: the agent's state, the CRL follower's
/// channel and every Workload API stream point at it (a million revocations make a 36 MB CRL).
/// What the agent reads from them is read once, when they arrive. CRLs too large for any
/// Workload API response are let go once written to `crl.pem` ([`Crls::release_if_over`]):
/// what is left (their digest, `nextUpdate`, serial count) still tells them apart.
#[derive(Clone, Default)]
pub struct Crls(Arc<Held>);

struct Held {
    /// `None` once released.
    ders: Mutex<Option<Arc<Vec<Bytes>>>>,
    /// How many CRLs, their sizes, and their size in octets all together.
    count: usize,
    lens: Vec<usize>,
    size: usize,
    /// SHA-256 over each CRL's length and octets: equal CRLs, without holding them.
    digest: [u8; 32],
    /// The earliest `nextUpdate`; `Err` when one of `ders` does not parse (a damaged
    /// `crl.pem` read back at start).
    next_update: Result<Option<i64>, ()>,
    serials: RevokedSerials,
}

impl Default for Held {
    fn default() -> Self {
        Self::new(Vec::new(), Ok(None), RevokedSerials::default())
    }
}

impl Held {
    fn new(
        ders: Vec<Bytes>,
        next_update: Result<Option<i64>, ()>,
        serials: RevokedSerials,
    ) -> Self {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        for der in &ders {
            h.update((der.len() as u64).to_be_bytes());
            h.update(der);
        }
        Self {
            count: ders.len(),
            lens: ders.iter().map(Bytes::len).collect(),
            size: ders.iter().map(Bytes::len).sum(),
            digest: h.finalize().into(),
            ders: Mutex::new(Some(Arc::new(ders))),
            next_update,
            serials,
        }
    }
}

impl Crls {
    /// CRLs from the CA (as decoded: slices of the buffer the answer arrived in); `Err` when
    /// one does not parse.
    pub(crate) fn new(ders: Vec<Bytes>) -> Result<Self, CrlError> {
        let (next_update, serials) = scan_all(&ders)?;
        Ok(Self(Arc::new(Held::new(ders, Ok(next_update), serials))))
    }

    /// CRLs read back from `crl.pem`: kept even if they do not parse (served until the CA is
    /// asked again, which it is at once: see [`Crls::next_update`]).
    pub(crate) fn read_back(ders: Vec<Vec<u8>>) -> Self {
        let ders: Vec<Bytes> = ders.into_iter().map(Bytes::from).collect();
        let held = match scan_all(&ders) {
            Ok((next_update, serials)) => Held::new(ders, Ok(next_update), serials),
            Err(_) => Held::new(ders, Err(()), RevokedSerials::default()),
        };
        Self(Arc::new(held))
    }

    /// The CRLs (DER); `None` once released (they are in `crl.pem`), or when there are none.
    pub fn ders(&self) -> Option<Arc<Vec<Bytes>>> {
        if self.is_empty() {
            return None;
        }
        self.0
            .ders
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.count == 0
    }

    /// How many CRLs.
    pub fn count(&self) -> usize {
        self.0.count
    }

    /// Their size in octets, all together.
    pub fn size(&self) -> usize {
        self.0.size
    }

    /// What they take in a message as repeated `bytes` field number `field`.
    pub(crate) fn encoded_len(&self, field: u32) -> usize {
        self.0
            .lens
            .iter()
            .map(|l| {
                prost::encoding::key_len(field) + prost::encoding::encoded_len_varint(*l as u64) + l
            })
            .sum()
    }

    /// Lets the DER go, in every clone, when it is over `limit` octets: nothing in memory needs
    /// CRLs too large for a Workload API response once they are written to `crl.pem` (a new
    /// generation of the files links the previous one's).
    pub(crate) fn release_if_over(&self, limit: usize) {
        if self.size() > limit {
            *self.0.ders.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
    }

    /// The earliest `nextUpdate` (seconds since the epoch); `Ok(None)` when none carries one,
    /// `Err` when one does not parse.
    pub(crate) fn next_update(&self) -> Result<Option<i64>, CrlError> {
        self.0.next_update.map_err(|()| CrlError::Malformed)
    }

    /// The serials they list, in a few bytes.
    pub(crate) fn serials(&self) -> RevokedSerials {
        self.0.serials
    }
}

impl PartialEq for Crls {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
            || (self.0.count == other.0.count && self.0.digest == other.0.digest)
    }
}

impl Eq for Crls {}

impl std::fmt::Debug for Crls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Crls")
            .field("crls", &self.0.count)
            .field("octets", &self.size())
            .field("revoked", &self.0.serials.len())
            .finish()
    }
}

/// What serials a set of CRLs lists, in a few bytes: how many, and an order-independent digest
/// of them. A CA with a million revocations sends a 36 MB CRL; the agent compares each one it
/// fetches with the one in hand to tell a routine refresh from news, and a set of a million
/// serials (one `Vec` each, twice) cost it ~100 MB per comparison.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
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

    fn add(&mut self, raw_serial: &[u8]) {
        self.count += 1;
        self.digest = self
            .digest
            .wrapping_add(crate::tls::serial_hash(raw_serial));
    }

    /// What `revocations` holds (its own CA's live serials), in the same form.
    fn of_set(revocations: &RevocationSet) -> Self {
        let (count, digest) = revocations.serial_digest(unix_now());
        Self { count, digest }
    }
}

/// The earliest `nextUpdate` of `crls` and the serials they list, or `Err` if one does not
/// parse.
fn scan_all(crls: &[Bytes]) -> Result<(Option<i64>, RevokedSerials), CrlError> {
    let mut earliest: Option<i64> = None;
    let mut serials = RevokedSerials::default();
    for der in crls {
        if let Some(t) = der::scan(der, |serial| serials.add(serial))? {
            earliest = Some(earliest.map_or(t, |e| e.min(t)));
        }
    }
    Ok((earliest, serials))
}

/// A CRL read in one pass without building it in memory. x509-parser materializes every
/// entry (~120 bytes each with its serial as a big integer): at a million revocations each
/// parse cost ~150 MB for a moment, and the agent parsed each CRL several times. This walks the
/// DER (strict: definite minimal lengths, the tags RFC 5280 puts where they are, nothing left
/// over) and hands each entry's serial (the INTEGER's content octets) to a callback.
mod der {
    use super::CrlError;

    const INTEGER: u8 = 0x02;
    const BIT_STRING: u8 = 0x03;
    const SEQUENCE: u8 = 0x30;
    const UTC_TIME: u8 = 0x17;
    const GENERALIZED_TIME: u8 = 0x18;
    /// `crlExtensions [0] EXPLICIT`.
    const EXTENSIONS: u8 = 0xa0;

    /// One element: tag, contents, and what follows it.
    fn next(input: &[u8]) -> Result<(u8, &[u8], &[u8]), CrlError> {
        let bad = || CrlError::Malformed;
        let (&tag, rest) = input.split_first().ok_or_else(bad)?;
        // Every tag in a CRL fits one octet.
        if tag & 0x1f == 0x1f {
            return Err(bad());
        }
        let (&first, rest) = rest.split_first().ok_or_else(bad)?;
        let (len, rest) = if first < 0x80 {
            (usize::from(first), rest)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return Err(bad()); // indefinite, or over 4 GiB
            }
            let (octets, rest) = rest.split_at(n);
            let len = octets
                .iter()
                .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
            // DER: the shortest form.
            if octets[0] == 0 || len < 0x80 {
                return Err(bad());
            }
            (len, rest)
        };
        if rest.len() < len {
            return Err(bad());
        }
        let (contents, rest) = rest.split_at(len);
        Ok((tag, contents, rest))
    }

    /// The element at the head of `input`, which must have `tag`.
    fn expect(input: &[u8], tag: u8) -> Result<(&[u8], &[u8]), CrlError> {
        match next(input)? {
            (t, contents, rest) if t == tag => Ok((contents, rest)),
            _ => Err(CrlError::Malformed),
        }
    }

    /// The element at the head of `input` if it has `tag`.
    fn optional(input: &[u8], tag: u8) -> Result<(Option<&[u8]>, &[u8]), CrlError> {
        match input.first() {
            Some(t) if *t == tag => {
                let (contents, rest) = expect(input, tag)?;
                Ok((Some(contents), rest))
            }
            _ => Ok((None, input)),
        }
    }

    fn is_time(tag: u8) -> bool {
        tag == UTC_TIME || tag == GENERALIZED_TIME
    }

    /// A `Time` (seconds since the epoch): UTCTime `YYMMDDHHMMSSZ` or GeneralizedTime
    /// `YYYYMMDDHHMMSSZ`, the forms RFC 5280 allows.
    fn time(tag: u8, contents: &[u8]) -> Result<i64, CrlError> {
        let bad = || CrlError::Malformed;
        let digits = |s: &[u8]| -> Result<u32, CrlError> {
            s.iter().try_fold(0u32, |acc, c| {
                char::from(*c)
                    .to_digit(10)
                    .map(|d| acc * 10 + d)
                    .ok_or_else(bad)
            })
        };
        let (year, rest) = match (tag, contents.len()) {
            (UTC_TIME, 13) => {
                let yy = digits(&contents[..2])?;
                (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &contents[2..])
            }
            (GENERALIZED_TIME, 15) => (digits(&contents[..4])?, &contents[4..]),
            _ => return Err(bad()),
        };
        if rest.last() != Some(&b'Z') {
            return Err(bad());
        }
        let field = |i: usize| digits(&rest[i..i + 2]);
        let month = time::Month::try_from(u8::try_from(field(0)?).map_err(|_| bad())?)
            .map_err(|_| bad())?;
        let date = time::Date::from_calendar_date(
            i32::try_from(year).map_err(|_| bad())?,
            month,
            u8::try_from(field(2)?).map_err(|_| bad())?,
        )
        .map_err(|_| bad())?;
        let hms = time::Time::from_hms(
            u8::try_from(field(4)?).map_err(|_| bad())?,
            u8::try_from(field(6)?).map_err(|_| bad())?,
            u8::try_from(field(8)?).map_err(|_| bad())?,
        )
        .map_err(|_| bad())?;
        Ok(date.with_time(hms).assume_utc().unix_timestamp())
    }

    /// Walks the CRL `der`, calling `serial` with each revoked entry's serial, and returns its
    /// `nextUpdate`, if it has one.
    pub(super) fn scan(der: &[u8], mut serial: impl FnMut(&[u8])) -> Result<Option<i64>, CrlError> {
        let bad = || CrlError::Malformed;
        let (list, rest) = expect(der, SEQUENCE)?;
        if !rest.is_empty() {
            return Err(bad());
        }
        let (tbs, list) = expect(list, SEQUENCE)?;
        let (_algorithm, list) = expect(list, SEQUENCE)?;
        let (_signature, list) = expect(list, BIT_STRING)?;
        if !list.is_empty() {
            return Err(bad());
        }
        let (_version, tbs) = optional(tbs, INTEGER)?;
        let (_algorithm, tbs) = expect(tbs, SEQUENCE)?;
        let (_issuer, tbs) = expect(tbs, SEQUENCE)?;
        let (tag, this_update, mut tbs) = next(tbs)?;
        if !is_time(tag) {
            return Err(bad());
        }
        time(tag, this_update)?;
        let mut next_update = None;
        if let Some(&tag) = tbs.first()
            && is_time(tag)
        {
            let (_, contents, rest) = next(tbs)?;
            next_update = Some(time(tag, contents)?);
            tbs = rest;
        }
        let (revoked, tbs) = optional(tbs, SEQUENCE)?;
        let (_extensions, tbs) = optional(tbs, EXTENSIONS)?;
        if !tbs.is_empty() {
            return Err(bad());
        }
        let mut entries = revoked.unwrap_or_default();
        while !entries.is_empty() {
            let (entry, rest) = expect(entries, SEQUENCE)?;
            entries = rest;
            let (number, entry) = expect(entry, INTEGER)?;
            if number.is_empty() {
                return Err(bad());
            }
            let (tag, _date, entry) = next(entry)?;
            if !is_time(tag) {
                return Err(bad());
            }
            let (_extensions, entry) = optional(entry, SEQUENCE)?;
            if !entry.is_empty() {
                return Err(bad());
            }
            serial(number);
        }
        Ok(next_update)
    }
}

/// `crls` as concatenated PEM (`X509 CRL` blocks), the form `crl.pem` holds.
#[cfg(test)]
pub(crate) fn to_pem(crls: &[Vec<u8>]) -> String {
    crls.iter()
        .map(|der| crate::ca::pem_encode("X509 CRL", der))
        .collect()
}

/// Writes `crls` to `w` as [`to_pem`] would make them, 48 octets (a line) at a time: the PEM
/// of a 36 MB CRL is 46 MiB, which the agent held whole for a moment at every change.
pub(crate) fn write_pem(crls: &[Bytes], w: &mut impl std::io::Write) -> std::io::Result<()> {
    use base64::Engine;
    let mut line = [0u8; 65];
    for der in crls {
        w.write_all(b"-----BEGIN X509 CRL-----\n")?;
        for chunk in der.chunks(48) {
            let n = base64::engine::general_purpose::STANDARD
                .encode_slice(chunk, &mut line)
                .map_err(std::io::Error::other)?;
            line[n] = b'\n';
            w.write_all(&line[..=n])?;
        }
        w.write_all(b"-----END X509 CRL-----\n")?;
    }
    Ok(())
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
    seed: Crls,
    max_backoff: Duration,
) -> (tokio::task::JoinHandle<()>, watch::Receiver<Crls>) {
    let (tx, rx) = watch::channel(seed.clone());
    let task = tokio::spawn(async move {
        let fetcher = Fetcher { link };
        let mut news = revocations.changes();
        let mut backoff = Backoff::new(Duration::from_secs(1), max_backoff);
        let mut last_failure: Option<String> = None;
        // What the CRLs in hand cover: the revocation set's revision when they were asked for.
        let mut covered = revocations.rev();
        let mut held_until = seed.next_update().ok().flatten();
        // Nothing in hand, or nothing usable (a damaged crl.pem read back at start): fetch now.
        // `refresh_at` is the fetch the CRLs' validity (or the backoff) asks for; `next` is
        // that or sooner, for news.
        let mut refresh_at = match seed.next_update() {
            Ok(Some(until)) if !seed.is_empty() => {
                Instant::now() + refresh_after(now_ms(), Some(until), jitter())
            }
            _ => Instant::now(),
        };
        let mut next = refresh_at;
        let mut last_fetch: Option<Instant> = None;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(next) => {
                    // Woken for news only: the CRLs in hand may list them already. A new agent's
                    // watch replays from 0 what the CRLs fetched at its start list: at a million
                    // revocations that was a second 36 MB fetch for nothing.
                    let held = tx.borrow().clone();
                    // Read before the set: what arrives after it is news again.
                    let asked_at = revocations.rev();
                    if Instant::now() < refresh_at
                        && last_failure.is_none()
                        && !held.is_empty()
                        && held.serials() == RevokedSerials::of_set(&revocations)
                    {
                        debug!(revoked = held.serials().len(), "the CRLs in hand already list every serial revoked; not fetched");
                        covered = asked_at;
                        next = refresh_at;
                        continue;
                    }
                }
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
                    refresh_at = Instant::now() + refresh_after(now_ms(), until, jitter());
                    next = refresh_at;
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
                    refresh_at = Instant::now() + wait;
                    next = refresh_at;
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
    async fn fetch(&self) -> Result<(Crls, Option<i64>), CrlError> {
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
        let crls = answer_ders(answer);
        if crls.is_empty() {
            return Err(CrlError::Malformed);
        }
        let crls = Crls::new(crls)?;
        let until = crls.next_update()?;
        Ok((crls, until))
    }
}

/// The CRLs of a `GetCrl` answer: the signing CA's, then a retiring one's, the empty left out.
pub(crate) fn answer_ders(answer: pb::Crl) -> Vec<Bytes> {
    std::iter::once(answer.der)
        .chain(answer.retiring)
        .filter(|d| !d.is_empty())
        .collect()
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

    /// The serials x509-parser reads from `der`, and its nextUpdate.
    fn by_x509_parser(der: &[u8]) -> (Vec<Vec<u8>>, Option<i64>) {
        use x509_parser::prelude::FromDer;
        let (_, crl) =
            x509_parser::revocation_list::CertificateRevocationList::from_der(der).unwrap();
        (
            crl.iter_revoked_certificates()
                .map(|r| r.raw_serial().to_vec())
                .collect(),
            crl.next_update().map(|t| t.timestamp()),
        )
    }

    fn scanned(der: &[u8]) -> (Vec<Vec<u8>>, Option<i64>) {
        let mut serials = Vec::new();
        let next = der::scan(der, |s| serials.push(s.to_vec())).unwrap();
        (serials, next)
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
        let crls = |ders: &[&Vec<u8>]| {
            Crls::new(ders.iter().map(|d| d.to_vec().into()).collect()).unwrap()
        };
        assert_eq!(crls(&[&a, &b]).next_update().unwrap(), Some(3_000));
        assert_eq!(crls(&[&a, &b]).serials(), crls(&[&b, &a]).serials());
        assert_eq!(crls(&[&a, &b]).serials().len(), 1);
        assert_ne!(crls(&[&a]).serials(), crls(&[&b]).serials());
        // Another serial, same count: told apart.
        let other = crate::ca::Serial::from_bytes(&[0x42, 2]);
        let c = ca.sign_crl(&[(other, 1_000)], 3, 1_000, 5_000).unwrap();
        assert_eq!(crls(&[&c]).serials().len(), 1);
        assert_ne!(crls(&[&a]).serials(), crls(&[&c]).serials());
        assert!(Crls::new(vec![a[..a.len() - 1].to_vec().into()]).is_err());
        let damaged = Crls::read_back(vec![a[..a.len() - 1].to_vec()]);
        assert!(!damaged.is_empty() && damaged.next_update().is_err());
        assert_eq!(Crls::default().next_update().unwrap(), None);
        // Released: the DER is gone from every clone, what was read from it stays, and it is
        // still equal to the same CRLs and unequal to others.
        let held = crls(&[&a, &b]);
        let clone = held.clone();
        held.release_if_over(held.size());
        assert!(clone.ders().is_some(), "not over the limit: kept");
        held.release_if_over(held.size() - 1);
        assert!(clone.ders().is_none() && !clone.is_empty());
        assert_eq!((clone.count(), clone.serials().len()), (2, 1));
        assert_eq!(clone.next_update().unwrap(), Some(3_000));
        assert_eq!(clone, crls(&[&a, &b]));
        assert_ne!(clone, crls(&[&b, &a]));
        assert_ne!(clone, crls(&[&a]));
        assert!(from_pem(b"not pem").is_empty());
    }

    /// The revocation set's digest of its own CA's live serials equals that of a CRL listing
    /// exactly those (serials of both shapes, one needing a leading zero in DER), and tells a
    /// missing or extra serial; relayed and expired entries do not count.
    #[test]
    fn the_set_and_a_crl_of_the_same_serials_have_the_same_digest() {
        let dir = tempfile::tempdir().unwrap();
        let td = crate::spiffe::TrustDomain::new("example.org").unwrap();
        let ca = crate::ca::Authority::load_or_create(dir.path(), &td, Default::default()).unwrap();
        let set = RevocationSet::new();
        let mut listed = Vec::new();
        let entry =
            |serial: &crate::ca::Serial, expires_at: i64, trust_domain: &str| pb::RevocationEntry {
                serial: serial.to_hex(),
                expires_at,
                trust_domain: trust_domain.into(),
                spiffe_id: "spiffe://b.example/x".into(),
                reason: "r".into(),
                rev: 1,
                ..Default::default()
            };
        for i in 0..5000u32 {
            let serial = if i % 1000 == 0 {
                crate::ca::Serial::from_bytes(&[0x80 | (i / 1000) as u8, 7]) // high bit
            } else {
                let mut b = [0u8; 17];
                b[0] = 1;
                b[1..5].copy_from_slice(&i.to_be_bytes());
                crate::ca::Serial::from_bytes(&b)
            };
            set.apply(&entry(&serial, i64::MAX, ""));
            listed.push((serial, 1_000));
        }
        set.apply(&entry(
            &crate::ca::Serial::from_bytes(&[0x01, 9]),
            i64::MAX,
            "b.example",
        ));
        set.apply(&entry(&crate::ca::Serial::from_bytes(&[0x01, 8]), 5, ""));
        let crl = |entries: &[(crate::ca::Serial, i64)]| {
            Crls::new(vec![ca.sign_crl(entries, 1, 1_000, 5_000).unwrap().into()])
                .unwrap()
                .serials()
        };
        assert_eq!(RevokedSerials::of_set(&set), crl(&listed));
        assert_ne!(RevokedSerials::of_set(&set), crl(&listed[1..]));
        let mut more = listed.clone();
        more.push((crate::ca::Serial::from_bytes(&[0x01, 9]), 1_000));
        assert_ne!(RevokedSerials::of_set(&set), crl(&more));
    }

    /// The one-pass reader finds what x509-parser finds in the CA's CRLs (serials of every
    /// length, a high bit that needs a leading zero, thousands of entries: long-form lengths),
    /// and refuses what is not a CRL; `write_pem` writes what `to_pem` makes.
    #[test]
    fn the_one_pass_reader_agrees_with_x509_parser() {
        let dir = tempfile::tempdir().unwrap();
        let td = crate::spiffe::TrustDomain::new("example.org").unwrap();
        let ca = crate::ca::Authority::load_or_create(dir.path(), &td, Default::default()).unwrap();
        let mut entries: Vec<(crate::ca::Serial, i64)> = (0..3000u32)
            .map(|i| {
                let mut b = [0u8; 17];
                b[0] = 1;
                b[1..5].copy_from_slice(&i.to_be_bytes());
                b[16] = 0x5a;
                (crate::ca::Serial::from_bytes(&b), 1_000 + i64::from(i))
            })
            .collect();
        entries.push((crate::ca::Serial::from_bytes(&[0xff, 0x01]), 1_000));
        entries.push((crate::ca::Serial::from_bytes(&[0x7f]), 1_000));
        for der in [
            ca.sign_crl(&entries, 9, 1_000, 2_000_000_000).unwrap(),
            ca.sign_crl(&entries[..1], 10, 1_000, 4_102_444_800)
                .unwrap(), // 2100: GeneralizedTime
            ca.sign_crl(&[], 11, 1_000, 5_000).unwrap(),
        ] {
            let (serials, next) = scanned(&der);
            assert_eq!((serials.clone(), next), by_x509_parser(&der));
            assert!(serials.len() <= entries.len());
            let mut pem = Vec::new();
            write_pem(&[der.clone().into(), der.clone().into()], &mut pem).unwrap();
            assert_eq!(pem, to_pem(&[der.clone(), der.clone()]).into_bytes());
            // Anything cut short, or with more after it, is refused.
            for cut in [1, 2, der.len() / 2, der.len() - 1] {
                assert!(der::scan(&der[..cut], |_| {}).is_err(), "cut at {cut}");
            }
            let mut longer = der.clone();
            longer.push(0);
            assert!(der::scan(&longer, |_| {}).is_err());
        }
        assert!(der::scan(b"", |_| {}).is_err());
        assert!(
            der::scan(&[0x30, 0x80, 0, 0], |_| {}).is_err(),
            "indefinite length"
        );
        assert!(
            der::scan(&[0x30, 0x81, 0x01, 0x00], |_| {}).is_err(),
            "long form for a short length"
        );
    }
}
