//! [`RevocationSet`]: revocations known to a workload, fed live from the CA's `Revocation.Watch`
//! stream by [`RevocationSet::follow`]; the mTLS verifiers consult it on every handshake.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::{TlsSource, unix_now};
use crate::ca::SvidInfo;
use crate::pb::v1::{RevocationEntry, WatchRequest, revocation_client::RevocationClient};

/// Revoked serials and identity rules, with their expiry so the set stays small.
#[derive(Debug)]
pub struct RevocationSet {
    inner: RwLock<Inner>,
    /// The revision, published on every change: followers wake on news instead of polling.
    changed: watch::Sender<u64>,
}

impl Default for RevocationSet {
    fn default() -> Self {
        Self {
            inner: RwLock::default(),
            changed: watch::channel(0).0,
        }
    }
}

#[derive(Debug)]
struct IdentityRule {
    /// Certificates with an earlier notBefore are revoked.
    before: i64,
    /// Still blocking: every certificate of the identity is revoked (its own CA issues none
    /// meanwhile, but a federated identity's CA does).
    blocked: bool,
    expires_at: i64,
    reason: String,
}

#[derive(Debug, Default)]
struct Inner {
    serials: Serials,
    /// spiffe_id → rule.
    identities: HashMap<String, IdentityRule>,
    rev: u64,
    /// Expired entries are swept once `serials` holds this many: twice what the last sweep left
    /// (at least [`SWEEP_MIN`]), so catching up on a million entries sweeps ~20 times, not once
    /// per 1,024 inserts (which made it quadratic), and expired entries at most double the set.
    sweep_at: usize,
}

/// The smallest set size that triggers a sweep of expired entries.
const SWEEP_MIN: usize = 1024;

/// The shape of every serial Lanyard's CA signs (`Serial::random`): `0x01` then 16 random
/// octets. Such a serial is held as those 16 octets.
const LANYARD_SERIAL_LEN: usize = 17;

/// The fewest recent inserts that are merged into the sorted table at once.
const MERGE_MIN: usize = 1024;
/// The most recent inserts held in a hash map before they are merged (bounds its memory: ~3
/// MiB at this size).
const MERGE_MAX: usize = 64 * 1024;

/// What an entry says besides its serial: its expiry (seconds since the epoch, clamped to
/// `u32`: 2106) and its [`Tag`], by index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Meta {
    expires: u32,
    tag: u32,
}

/// One entry of the sorted table: 24 octets. A million revocations hold 24 MB here, against
/// ~200 bytes each with a hex `String` key and a `String` reason in a `HashMap` (decision 109).
#[derive(Debug, Clone, Copy)]
struct Slot {
    serial: [u8; 16],
    meta: Meta,
}

/// The reason of an entry, and for one relayed from a federated domain's CA the identity it
/// covers (serials of two CAs can collide). Interned: a million revocations share a few.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Tag {
    reason: Arc<str>,
    relayed_for: Option<Arc<str>>,
}

/// Revoked serials, sized for a million: Lanyard-shaped serials in a sorted `Vec` of 24-octet
/// slots (looked up by binary search) fed through a small hash map of recent inserts, merged
/// in when it reaches an eighth of the table (between [`MERGE_MIN`] and [`MERGE_MAX`]), so a
/// catch-up of a million inserts moves each slot a few times, not once per insert. Serials of
/// any other shape (another CA's, relayed) are kept as they are in a map of their own.
#[derive(Debug, Default)]
struct Serials {
    /// Sorted by serial, no repeats; disjoint from `recent`.
    sorted: Vec<Slot>,
    recent: HashMap<[u8; 16], Meta>,
    other: HashMap<Box<[u8]>, Meta>,
    tags: Vec<Tag>,
    tag_ids: HashMap<Tag, u32>,
    /// The tag interned last: consecutive entries mostly share theirs.
    last_tag: Option<u32>,
}

/// The 16 random octets of a Lanyard-shaped serial (canonical big-endian bytes).
fn short(serial: &[u8]) -> Option<[u8; 16]> {
    match serial {
        [0x01, rest @ ..] if serial.len() == LANYARD_SERIAL_LEN => rest.try_into().ok(),
        _ => None,
    }
}

/// `t` (seconds since the epoch) as a slot holds it.
fn clamp_time(t: i64) -> u32 {
    u32::try_from(t.max(0)).unwrap_or(u32::MAX)
}

/// The canonical big-endian bytes of a hex serial as the CA sends it (case and a missing
/// leading zero do not matter, leading zero octets are dropped as `Serial::from_bytes` does);
/// `None` when it is not hex. Unlike `Serial::parse_hex`, any length: a federated CA's serials
/// are its own business.
fn serial_bytes(hex: &str) -> Option<Vec<u8>> {
    let hex = hex.as_bytes();
    if hex.is_empty() {
        return None;
    }
    let digit = |c: u8| char::from(c).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(hex.len().div_ceil(2));
    let (head, rest) = hex.split_at(hex.len() % 2);
    if let [c] = head {
        out.push(digit(*c)?);
    }
    for pair in rest.chunks_exact(2) {
        out.push(digit(pair[0])? << 4 | digit(pair[1])?);
    }
    // Canonical as `Serial::from_bytes` makes it: no leading zero octets, zero as one.
    let zeros = out
        .iter()
        .take_while(|b| **b == 0)
        .count()
        .min(out.len() - 1);
    out.drain(..zeros);
    Some(out)
}

// === impl Serials ===

impl Serials {
    fn len(&self) -> usize {
        self.sorted.len() + self.recent.len() + self.other.len()
    }

    /// The index of `reason` + `relayed_for`, interned.
    fn intern(&mut self, reason: &str, relayed_for: Option<&str>) -> u32 {
        if let Some(id) = self.last_tag
            && let Some(t) = self.tags.get(id as usize)
            && &*t.reason == reason
            && t.relayed_for.as_deref() == relayed_for
        {
            return id;
        }
        let tag = Tag {
            reason: reason.into(),
            relayed_for: relayed_for.map(Into::into),
        };
        let id = match self.tag_ids.get(&tag) {
            Some(id) => *id,
            None => {
                // More distinct reasons than u32 holds cannot fit in memory anyway.
                let id = u32::try_from(self.tags.len()).unwrap_or(u32::MAX);
                self.tags.push(tag.clone());
                self.tag_ids.insert(tag, id);
                id
            }
        };
        self.last_tag = Some(id);
        id
    }

    fn tag(&self, meta: Meta) -> Option<&Tag> {
        self.tags.get(meta.tag as usize)
    }

    /// Adds or replaces the entry of `serial` (canonical bytes).
    fn insert(&mut self, serial: &[u8], expires_at: i64, reason: &str, relayed_for: Option<&str>) {
        let meta = Meta {
            expires: clamp_time(expires_at),
            tag: self.intern(reason, relayed_for),
        };
        let Some(key) = short(serial) else {
            self.other.insert(serial.into(), meta);
            return;
        };
        // Not looked up in `sorted` first (a binary search of a 24 MB table is ~20 cache
        // misses): a serial already there is replaced when `recent` is merged, and `recent` is
        // asked first until then.
        self.recent.insert(key, meta);
        if self.recent.len() >= (self.sorted.len() / 8).clamp(MERGE_MIN, MERGE_MAX) {
            self.merge();
        }
    }

    /// Moves `recent` into `sorted`, in place: the table grows by exactly what is added
    /// (`reserve_exact`: a large block is grown by the allocator without a copy), then the two
    /// sorted runs are merged from the back; a serial in both keeps its recent entry.
    fn merge(&mut self) {
        let mut add: Vec<Slot> = self
            .recent
            .drain()
            .map(|(serial, meta)| Slot { serial, meta })
            .collect();
        self.recent.shrink_to(MERGE_MIN);
        add.sort_unstable_by_key(|a| a.serial);
        let old = self.sorted.len();
        self.sorted.reserve_exact(add.len());
        let filler = add.first().copied();
        if let Some(f) = filler {
            self.sorted.resize(old + add.len(), f);
        }
        // k - (i + j) only grows (by one per serial in both), so a write at k never lands on
        // an unread slot of `sorted`.
        let (mut i, mut j, mut k) = (old, add.len(), self.sorted.len());
        while j > 0 {
            k -= 1;
            let (mine, new) = (self.sorted.get(i.wrapping_sub(1)), &add[j - 1]);
            match mine.map(|m| m.serial.cmp(&new.serial)) {
                Some(std::cmp::Ordering::Greater) => {
                    self.sorted[k] = self.sorted[i - 1];
                    i -= 1;
                }
                Some(std::cmp::Ordering::Equal) => {
                    self.sorted[k] = *new;
                    i -= 1;
                    j -= 1;
                }
                _ => {
                    self.sorted[k] = *new;
                    j -= 1;
                }
            }
        }
        // Serials in both left a gap of as many slots at the front.
        let gap = k - i;
        if gap > 0 {
            self.sorted.copy_within(0..i, gap);
            self.sorted.drain(..gap);
        }
    }

    fn get(&self, serial: &[u8]) -> Option<Meta> {
        let Some(key) = short(serial) else {
            return self.other.get(serial).copied();
        };
        if let Some(m) = self.recent.get(&key) {
            return Some(*m);
        }
        self.sorted
            .binary_search_by(|s| s.serial.cmp(&key))
            .ok()
            .map(|i| self.sorted[i].meta)
    }

    /// Drops entries that expired before `now`, and the tags no entry uses any more.
    fn sweep(&mut self, now: i64) {
        let now = clamp_time(now);
        self.sorted.retain(|s| s.meta.expires >= now);
        self.sorted.shrink_to_fit();
        self.recent.retain(|_, m| m.expires >= now);
        self.other.retain(|_, m| m.expires >= now);
        // Renumber the tags still in use.
        let mut renumber = vec![u32::MAX; self.tags.len()];
        let mut tags = Vec::new();
        let mut visit = |m: &mut Meta| {
            let old = m.tag as usize;
            if let Some(new) = renumber.get_mut(old) {
                if *new == u32::MAX {
                    *new = u32::try_from(tags.len()).unwrap_or(u32::MAX);
                    if let Some(t) = self.tags.get(old) {
                        tags.push(t.clone());
                    }
                }
                m.tag = *new;
            }
        };
        self.sorted.iter_mut().for_each(|s| visit(&mut s.meta));
        self.recent.values_mut().for_each(&mut visit);
        self.other.values_mut().for_each(&mut visit);
        self.tag_ids = tags
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        self.tags = tags;
        self.last_tag = None;
    }
}

/// A serial's part in an order-independent digest of a set of serials (a wrapping sum of
/// these): SipHash with fixed keys of the serial as a CRL entry's INTEGER holds it (`raw`: its
/// content octets). The agent compares its set's with its CRLs' (`agent::crl`).
pub(crate) fn serial_hash(raw: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    #[allow(
        deprecated,
        reason = "a fixed-key SipHash: a digest, not a hash table's"
    )]
    let mut h = std::hash::SipHasher::new();
    raw.hash(&mut h);
    h.finish()
}

impl RevocationSet {
    /// How many serials of this trust domain's CA (not relayed) are revoked and live at `now`,
    /// and their digest ([`serial_hash`]): equal to a CRL's when it lists exactly those.
    pub(crate) fn serial_digest(&self, now: i64) -> (usize, u64) {
        let mut g = self.inner.write().unwrap_or_else(|p| p.into_inner());
        // One entry per serial, in `sorted` and `other` only.
        g.serials.merge();
        let s = &g.serials;
        let now = clamp_time(now);
        let counted =
            |m: &Meta| m.expires >= now && s.tag(*m).is_some_and(|t| t.relayed_for.is_none());
        let mut count = 0usize;
        let mut digest = 0u64;
        let mut raw = [0u8; LANYARD_SERIAL_LEN];
        raw[0] = 0x01;
        for slot in s.sorted.iter().filter(|slot| counted(&slot.meta)) {
            raw[1..].copy_from_slice(&slot.serial);
            count += 1;
            digest = digest.wrapping_add(serial_hash(&raw));
        }
        for (serial, _) in s.other.iter().filter(|(_, m)| counted(m)) {
            // A DER INTEGER is signed: a leading octet with its high bit set takes a zero first.
            let h = if serial.first().is_some_and(|b| *b >= 0x80) {
                serial_hash(&[&[0u8][..], serial].concat())
            } else {
                serial_hash(serial)
            };
            count += 1;
            digest = digest.wrapping_add(h);
        }
        (count, digest)
    }

    /// An empty set.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Adds one entry from the CA.
    pub fn apply(&self, e: &RevocationEntry) {
        let mut g = self.inner.write().unwrap_or_else(|p| p.into_inner());
        if e.identity_rule {
            g.identities.insert(
                e.spiffe_id.clone(),
                IdentityRule {
                    before: e.before,
                    blocked: e.blocked,
                    expires_at: e.expires_at,
                    reason: e.reason.clone(),
                },
            );
        } else if let Some(serial) = serial_bytes(&e.serial) {
            let relayed_for = (!e.trust_domain.is_empty()).then_some(e.spiffe_id.as_str());
            g.serials
                .insert(&serial, e.expires_at, &e.reason, relayed_for);
        } else {
            // No certificate's serial prints as this: it could never match one.
            debug!(serial = %e.serial, "ignoring a revocation whose serial is not hex");
        }
        g.rev = g.rev.max(e.rev);
        let now = unix_now();
        if g.serials.len() >= g.sweep_at.max(SWEEP_MIN) {
            g.serials.sweep(now);
            g.identities.retain(|_, r| r.expires_at >= now);
            g.sweep_at = (2 * g.serials.len()).max(SWEEP_MIN);
        }
        let rev = g.rev;
        drop(g);
        self.changed.send_replace(rev);
    }

    /// A receiver marked changed whenever an entry is applied (its value is the revision).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Records that the CA reported `svid` itself as revoked (`reason` is its message).
    pub(crate) fn mark_revoked(&self, svid: &SvidInfo, reason: &str) {
        warn!(serial = %svid.serial, reason, "the CA reports our own certificate as revoked");
        let mut g = self.inner.write().unwrap_or_else(|p| p.into_inner());
        g.serials
            .insert(svid.serial.as_bytes(), svid.not_after, reason, None);
        let rev = g.rev;
        drop(g);
        self.changed.send_replace(rev);
    }

    /// Why `svid` is revoked, if it is.
    pub fn check(&self, svid: &SvidInfo) -> Option<String> {
        let g = self.inner.read().unwrap_or_else(|p| p.into_inner());
        if let Some(tag) = g
            .serials
            .get(svid.serial.as_bytes())
            .and_then(|m| g.serials.tag(m))
            && tag
                .relayed_for
                .as_deref()
                .is_none_or(|id| id == svid.spiffe_id.as_str())
        {
            return Some(format!(
                "certificate {} is revoked: {}",
                svid.serial, tag.reason
            ));
        }
        match g.identities.get(svid.spiffe_id.as_str()) {
            Some(r) if r.blocked || svid.not_before < r.before => Some(format!(
                "identity {} is revoked: {}",
                svid.spiffe_id, r.reason
            )),
            _ => None,
        }
    }

    /// The highest revision seen (resume point for the watch).
    pub fn rev(&self) -> u64 {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).rev
    }

    /// Follows the CA's revocation stream at `server`, authenticating with `source`'s
    /// credential, reconnecting with backoff and resuming where it stopped. Runs until the
    /// returned task is aborted.
    pub fn follow(
        self: &Arc<Self>,
        server: String,
        source: Arc<TlsSource>,
    ) -> tokio::task::JoinHandle<()> {
        let set = self.clone();
        super::source::spawn_follow("revocations", move || {
            let (set, server, source) = (set.clone(), server.clone(), source.clone());
            async move { set.watch_once(&server, &source).await }
        })
    }

    async fn watch_once(&self, server: &str, source: &Arc<TlsSource>) -> Result<(), String> {
        let channel = source.connect_ca(server).await.map_err(|e| e.to_string())?;
        let mut stream = self.open_watch(channel, source).await?;
        info!(server, since = self.rev(), "following revocations");
        super::source::drain("revocations", &mut stream, |e| self.apply(&e)).await
    }

    /// Starts `Revocation.Watch` on `channel` from the revision in hand. A refusal because
    /// `source`'s own certificate is revoked marks it revoked here before it is returned.
    pub(crate) async fn open_watch(
        &self,
        channel: tonic::transport::Channel,
        source: &TlsSource,
    ) -> Result<tonic::Streaming<RevocationEntry>, String> {
        let stream = match RevocationClient::new(channel)
            .watch(WatchRequest { since: self.rev() })
            .await
        {
            Ok(r) => r.into_inner(),
            Err(s) => {
                // The CA refuses the watch because our own certificate (or identity) is revoked,
                // which happens when the revocation came while we were not watching (a restart,
                // a reconnect). That is news the holder must act on, not a retryable error.
                if s.code() == tonic::Code::FailedPrecondition
                    && s.message().contains("revoked")
                    && let Some(own) = source.svid()
                {
                    self.mark_revoked(&own, s.message());
                }
                return Err(s.message().to_string());
            }
        };
        Ok(stream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::Serial;
    use crate::spiffe::SpiffeId;

    fn svid(not_before: i64) -> SvidInfo {
        SvidInfo {
            spiffe_id: SpiffeId::parse("spiffe://b.example/ops/eve").unwrap(),
            roles: vec![],
            serial: Serial::from_bytes(&[7]),
            not_before,
            not_after: not_before + 60,
        }
    }

    fn rule(blocked: bool, rev: u64) -> RevocationEntry {
        RevocationEntry {
            spiffe_id: "spiffe://b.example/ops/eve".into(),
            identity_rule: true,
            before: 1000,
            blocked,
            expires_at: i64::MAX,
            reason: "key leak".into(),
            rev,
            ..Default::default()
        }
    }

    #[test]
    fn a_blocking_identity_rule_covers_later_certificates_until_lifted() {
        let set = RevocationSet::new();
        set.apply(&rule(true, 1));
        assert!(set.check(&svid(900)).is_some());
        assert!(set.check(&svid(2000)).is_some(), "blocked: any notBefore");
        set.apply(&rule(false, 2));
        assert!(set.check(&svid(900)).is_some());
        assert!(set.check(&svid(2000)).is_none(), "lifted: only older ones");
        assert_eq!(set.rev(), 2);
    }

    fn serial_entry(i: u64, expires_at: i64) -> RevocationEntry {
        RevocationEntry {
            serial: format!("{i:x}"),
            expires_at,
            reason: "test".into(),
            rev: i,
            ..Default::default()
        }
    }

    /// Expired entries are swept once the set doubles since the last sweep: they never make
    /// it more than twice its live size (beyond the minimum), and live ones always stay.
    #[test]
    fn expired_entries_are_swept_as_the_set_doubles() {
        let set = RevocationSet::new();
        let live = i64::MAX;
        for i in 1..=3000 {
            // Every other entry has already expired.
            set.apply(&serial_entry(i, if i % 2 == 0 { 0 } else { live }));
            let g = set.inner.read().unwrap();
            let alive = i.div_ceil(2) as usize;
            assert!(
                g.serials.len() <= (2 * alive + 1).max(SWEEP_MIN),
                "{} entries held for {alive} live ones",
                g.serials.len()
            );
        }
        let g = set.inner.read().unwrap();
        assert!(g.serials.len() < 3000, "a sweep ran");
        for i in (1..=3000u64).step_by(2) {
            let serial = serial_bytes(&format!("{i:x}")).unwrap();
            assert!(g.serials.get(&serial).is_some(), "live {i} kept");
        }
    }

    fn lanyard_serial(rng: &mut impl rand::Rng) -> Serial {
        let mut b = [0u8; 17];
        b[0] = 1;
        rng.fill(&mut b[1..]);
        Serial::from_bytes(&b)
    }

    fn cert(serial: &Serial, id: &str) -> SvidInfo {
        SvidInfo {
            spiffe_id: SpiffeId::parse(id).unwrap(),
            roles: vec![],
            serial: serial.clone(),
            not_before: 0,
            not_after: i64::MAX,
        }
    }

    /// The compact table answers as a plain map of every entry would, across merges of recent
    /// inserts into the sorted table, replaced entries in both, and serials of other shapes.
    #[test]
    fn the_compact_table_answers_like_a_map_of_every_entry() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let set = RevocationSet::new();
        let mut model: HashMap<Vec<u8>, String> = HashMap::new();
        let mut serials: Vec<Serial> = Vec::new();
        for i in 0..20_000u64 {
            // Some replace an entry (the same serial revoked again with another reason).
            let serial = if i % 7 == 3 && !serials.is_empty() {
                serials[rng.random_range(0..serials.len())].clone()
            } else if i % 1000 == 5 {
                Serial::from_bytes(&i.to_be_bytes()) // another CA's shape
            } else {
                lanyard_serial(&mut rng)
            };
            let reason = format!("reason {}", i % 13);
            set.apply(&RevocationEntry {
                serial: if i % 2 == 0 {
                    serial.to_hex()
                } else {
                    serial.to_hex().to_uppercase()
                },
                expires_at: i64::MAX,
                reason: reason.clone(),
                rev: i + 1,
                ..Default::default()
            });
            model.insert(serial.as_bytes().to_vec(), reason);
            serials.push(serial);
            // Answers while entries sit in the recent map, not only after a merge.
            if i % 997 == 0 {
                for s in &serials {
                    let got = set.check(&cert(s, "spiffe://example.org/x")).unwrap();
                    assert!(got.ends_with(&model[s.as_bytes()]), "{got}");
                }
            }
        }
        let mut g = set.inner.write().unwrap();
        assert!(g.serials.len() >= model.len());
        assert!(
            g.serials.sorted.len() > model.len() / 2,
            "merged into the table"
        );
        // Replaced serials sit in both parts until a merge keeps the recent entry.
        g.serials.merge();
        assert_eq!(g.serials.len(), model.len());
        assert!(
            g.serials
                .sorted
                .windows(2)
                .all(|w| w[0].serial < w[1].serial)
        );
        assert_eq!(g.serials.tags.len(), 13, "reasons interned");
        drop(g);
        for s in &serials {
            let got = set.check(&cert(s, "spiffe://example.org/x")).unwrap();
            assert_eq!(
                got,
                format!("certificate {s} is revoked: {}", model[s.as_bytes()])
            );
        }
        for _ in 0..1000 {
            assert!(
                set.check(&cert(&lanyard_serial(&mut rng), "spiffe://example.org/x"))
                    .is_none()
            );
        }
    }

    /// A serial relayed from a federated CA covers only the identity it names; one's own
    /// certificate is marked revoked whatever its shape.
    #[test]
    fn relayed_serials_cover_their_identity_only() {
        let mut rng = rand::rng();
        let set = RevocationSet::new();
        let serial = lanyard_serial(&mut rng);
        set.apply(&RevocationEntry {
            serial: serial.to_hex(),
            spiffe_id: "spiffe://b.example/ops/eve".into(),
            trust_domain: "b.example".into(),
            expires_at: i64::MAX,
            reason: "relayed".into(),
            rev: 1,
            ..Default::default()
        });
        assert!(
            set.check(&cert(&serial, "spiffe://b.example/ops/eve"))
                .is_some()
        );
        assert!(
            set.check(&cert(&serial, "spiffe://b.example/ops/bob"))
                .is_none()
        );
        let own = svid(0);
        assert!(set.check(&own).is_none());
        set.mark_revoked(&own, "refused by the CA");
        assert_eq!(
            set.check(&own).unwrap(),
            "certificate 07 is revoked: refused by the CA"
        );
    }

    #[test]
    fn serials_from_the_ca_are_read_as_canonical_bytes() {
        assert_eq!(serial_bytes("0A").unwrap(), vec![0x0a]);
        assert_eq!(serial_bytes("a").unwrap(), vec![0x0a]);
        assert_eq!(serial_bytes("000a").unwrap(), vec![0x0a]);
        assert_eq!(serial_bytes("00").unwrap(), vec![0]);
        assert_eq!(serial_bytes(&"ab".repeat(30)).unwrap(), vec![0xab; 30]);
        assert!(serial_bytes("").is_none());
        assert!(serial_bytes("0x0a").is_none());
        assert!(serial_bytes("zz").is_none());
        let s = Serial::parse_hex("01deadbeef").unwrap();
        assert_eq!(serial_bytes(&s.to_hex()).unwrap(), s.as_bytes());
    }

    /// A merge keeps the recent entry of a serial in both parts, wherever it falls (first,
    /// middle, last), and closes the gap it leaves.
    #[test]
    fn a_merge_keeps_the_recent_entry_of_a_serial_in_both() {
        let key = |b: u8| {
            let mut k = [0u8; 17];
            k[0] = 1;
            k[16] = b;
            k
        };
        let mut s = Serials::default();
        for b in [10, 20, 30, 40] {
            s.insert(&key(b), 1_000, "old", None);
        }
        s.merge();
        for b in [5, 10, 25, 40, 50] {
            s.insert(&key(b), 2_000, "new", None);
        }
        s.merge();
        let got: Vec<(u8, &str)> = s
            .sorted
            .iter()
            .map(|slot| (slot.serial[15], &*s.tags[slot.meta.tag as usize].reason))
            .collect();
        assert_eq!(
            got,
            [
                (5, "new"),
                (10, "new"),
                (20, "old"),
                (25, "new"),
                (30, "old"),
                (40, "new"),
                (50, "new")
            ]
        );
        assert_eq!(s.len(), 7);
        // A serial only in `sorted` is found there; one in both answers with the recent entry.
        s.insert(&key(20), 3_000, "newer", None);
        let m = s.get(&key(20)).unwrap();
        assert_eq!((&*s.tag(m).unwrap().reason, m.expires), ("newer", 3_000));
        assert_eq!(&*s.tag(s.get(&key(30)).unwrap()).unwrap().reason, "old");
    }

    /// A sweep drops expired entries from every part of the table, and the reasons only they
    /// used.
    #[test]
    fn a_sweep_drops_expired_entries_and_their_reasons() {
        let mut rng = rand::rng();
        let mut s = Serials::default();
        let live: Vec<Serial> = (0..3000).map(|_| lanyard_serial(&mut rng)).collect();
        for (i, serial) in live.iter().enumerate() {
            s.insert(serial.as_bytes(), 2_000, &format!("live {}", i % 3), None);
            s.insert(
                lanyard_serial(&mut rng).as_bytes(),
                1_000,
                &format!("old {i}"),
                None,
            );
        }
        s.insert(&[0x42], 1_000, "old other", None);
        s.insert(&[0x43], 2_000, "live other", None);
        assert!(!s.recent.is_empty() && !s.sorted.is_empty());
        s.sweep(1_500);
        assert_eq!(s.len(), 3001);
        assert_eq!(s.tags.len(), 4);
        assert_eq!(s.tag_ids.len(), 4);
        for (i, serial) in live.iter().enumerate() {
            let m = s.get(serial.as_bytes()).unwrap();
            assert_eq!(&*s.tag(m).unwrap().reason, format!("live {}", i % 3));
        }
        assert_eq!(
            &*s.tag(s.get(&[0x43]).unwrap()).unwrap().reason,
            "live other"
        );
        assert!(s.get(&[0x42]).is_none());
        // Interning goes on after the renumbering.
        s.insert(&[0x44], 2_000, "live 1", None);
        assert_eq!(s.tags.len(), 4);
    }
}
