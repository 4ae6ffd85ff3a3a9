//! The in-memory revocation index: every live revocation, so `Revocation.Check`, the mTLS
//! revocation check of every authenticated call, `Revocation.Watch` and the CRL never read the
//! database. The sled backend keeps it in step inside [`super::Store::commit`] and
//! [`super::Store::prune`] and rebuilds it at open; the etcd backend keeps it as part of its
//! mirror, applying every replica's commits from its watch, and reloads it at start.
//!
//! Each entry carries one `aux` number for the backend: etcd keeps the key's mod revision there
//! (its prune and guards compare it); sled keeps 0.
//!
//! Sized for a million serial entries in about 100 bytes each: a serial is kept as its bytes
//! (not hex), the identity, reason and origin strings once each however many entries share them
//! (an identity revocation lists every live certificate with one reason), and a rev-ordered list
//! of serials answers "everything after rev N" with a binary search instead of a scan.

use std::collections::HashMap;
use std::sync::Arc;

use super::{RECORD_VERSION, RevocationBrief, RevocationRecord};

/// Live entries one lock of the index hands out to [`walk`] or [`RevIndex::page`]: a commit
/// waits for at most this many copies, however many entries the index holds.
pub(super) const CHUNK: usize = 4096;

/// A serial in canonical lowercase hex, kept as its bytes: `[len, bytes.., 0 padding]`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct SerialKey([u8; 21]);

impl SerialKey {
    /// The key of a serial given as an even-length lowercase hex string of 1 to 20 bytes (what
    /// `Serial::to_hex` writes); `None` for any other spelling, which is then kept whole.
    fn parse(hex: &str) -> Option<Self> {
        let b = hex.as_bytes();
        if b.is_empty() || b.len() > 40 || b.len() % 2 != 0 {
            return None;
        }
        let mut k = [0u8; 21];
        k[0] = (b.len() / 2) as u8;
        for (i, pair) in b.chunks_exact(2).enumerate() {
            k[i + 1] = (nibble(pair[0])? << 4) | nibble(pair[1])?;
        }
        Some(Self(k))
    }

    fn bytes(&self) -> &[u8] {
        &self.0[1..1 + usize::from(self.0[0])]
    }

    fn hex(&self) -> String {
        crate::encoding::hex(self.bytes())
    }
}

/// The bytes of a serial in canonical lowercase hex (see [`SerialKey::parse`]).
pub(super) fn serial_bytes(hex: &str) -> Option<Vec<u8>> {
    SerialKey::parse(hex).map(|k| k.bytes().to_vec())
}

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

/// A serial entry without its serial, its strings interned: 40 bytes, so a table slot with its
/// key is 64.
#[derive(Clone, Copy)]
struct Slot {
    rev: u64,
    aux: i64,
    expires_at: i64,
    /// `expires_at - revoked_at` (an entry where that does not fit is kept whole).
    lead: u32,
    spiffe_id: u32,
    /// The interned reason, and [`RENEWABLE`] when the holder may still renew.
    reason: u32,
    origin: u32,
}

/// The `renewable` flag, in [`Slot::reason`]'s top bit.
const RENEWABLE: u32 = 1 << 31;

/// Strings shared by many entries, reference-counted so pruned ones are freed.
#[derive(Default)]
struct Interner {
    ids: HashMap<Arc<str>, u32>,
    strs: Vec<(Arc<str>, u32)>,
    free: Vec<u32>,
}

impl Interner {
    fn intern(&mut self, s: &str) -> u32 {
        if let Some(&id) = self.ids.get(s) {
            self.strs[id as usize].1 += 1;
            return id;
        }
        let s: Arc<str> = Arc::from(s);
        let id = match self.free.pop() {
            Some(id) => {
                self.strs[id as usize] = (s.clone(), 1);
                id
            }
            None => {
                self.strs.push((s.clone(), 1));
                // Below 2^31: the top bit of an id in a slot is a flag. (2^31 distinct strings
                // would take far more memory than any CA has.)
                ((self.strs.len() - 1) as u32) & !RENEWABLE
            }
        };
        self.ids.insert(s, id);
        id
    }

    fn release(&mut self, id: u32) {
        let Some((s, refs)) = self.strs.get_mut(id as usize) else {
            return;
        };
        *refs = refs.saturating_sub(1);
        if *refs == 0 {
            self.ids.remove(&**s);
            *s = Arc::from("");
            self.free.push(id);
        }
    }

    fn get(&self, id: u32) -> &str {
        self.strs.get(id as usize).map_or("", |(s, _)| s)
    }
}

/// Every live revocation, in memory (see the module documentation).
#[derive(Default)]
pub(super) struct RevIndex {
    serials: HashMap<SerialKey, Slot>,
    /// Serial entries that do not fit a [`Slot`] (an unusual serial spelling, a field a serial
    /// entry does not normally set, another record version): rare, kept whole.
    odd: HashMap<String, (RevocationRecord, i64)>,
    /// Identity rules by SPIFFE ID, with their `aux`: few.
    rules: HashMap<String, (RevocationRecord, i64)>,
    /// `(rev, serial)` in rev order for [`RevIndex::since`]; an item whose serial now has another
    /// rev (replaced or pruned) is stale and skipped, and dropped once they are many.
    log: Vec<(u64, SerialKey)>,
    stale: usize,
    /// Loading in bulk (in key order, not rev order): `log` is sorted once at the end.
    loading: bool,
    strings: Interner,
}

impl RevIndex {
    /// Adds or replaces the entry `r` describes.
    pub(super) fn insert(&mut self, r: &RevocationRecord) {
        self.insert_with(r, 0);
    }

    /// Adds or replaces the entry `r` describes, with the backend's `aux` number.
    pub(super) fn insert_with(&mut self, r: &RevocationRecord, aux: i64) {
        if r.identity_rule {
            self.rules.insert(r.spiffe_id.clone(), (r.clone(), aux));
            return;
        }
        let lead = r
            .expires_at
            .checked_sub(r.revoked_at)
            .and_then(|d| u32::try_from(d).ok());
        let key = SerialKey::parse(&r.serial)
            .filter(|_| r.v == RECORD_VERSION && r.before == 0 && !r.blocked)
            .zip(lead);
        // One serial lives in one place: a replacement may move it between the two.
        self.remove_serial(&r.serial);
        let Some((key, lead)) = key else {
            self.odd.insert(r.serial.clone(), (r.clone(), aux));
            return;
        };
        let reason = self.strings.intern(&r.reason);
        let slot = Slot {
            rev: r.rev,
            aux,
            expires_at: r.expires_at,
            lead,
            spiffe_id: self.strings.intern(&r.spiffe_id),
            reason: reason | if r.renewable { RENEWABLE } else { 0 },
            origin: self.strings.intern(&r.origin),
        };
        self.serials.insert(key, slot);
        // Commits arrive in rev order; only out-of-order writes (tests, tools) pay an insert.
        match self.log.last() {
            Some((last, _)) if *last > r.rev && !self.loading => {
                let at = self.log.partition_point(|(rev, _)| *rev <= r.rev);
                self.log.insert(at, (r.rev, key));
            }
            _ => self.log.push((r.rev, key)),
        }
    }

    /// Starts a bulk load: entries may come in any order until [`RevIndex::finish_load`].
    pub(super) fn start_load(&mut self) {
        self.loading = true;
    }

    /// Ends a bulk load: puts the rev list in order.
    pub(super) fn finish_load(&mut self) {
        if self.loading {
            self.log.sort_by_key(|(rev, _)| *rev);
            self.loading = false;
        }
    }

    /// Removes a serial entry; whether there was one.
    pub(super) fn remove_serial(&mut self, serial: &str) -> bool {
        if let Some(key) = SerialKey::parse(serial)
            && let Some(slot) = self.serials.remove(&key)
        {
            for id in [slot.spiffe_id, slot.reason & !RENEWABLE, slot.origin] {
                self.strings.release(id);
            }
            self.stale += 1;
            if self.stale > 4096 && self.stale > self.log.len() / 2 {
                let serials = &self.serials;
                self.log
                    .retain(|(rev, k)| serials.get(k).is_some_and(|s| s.rev == *rev));
                self.stale = 0;
            }
            return true;
        }
        self.odd.remove(serial).is_some()
    }

    /// Removes an identity rule; whether there was one.
    pub(super) fn remove_rule(&mut self, spiffe_id: &str) -> bool {
        self.rules.remove(spiffe_id).is_some()
    }

    /// The entry of one serial (hex, as stored).
    pub(super) fn serial(&self, serial: &str) -> Option<RevocationRecord> {
        self.serial_with(serial).map(|(r, _)| r)
    }

    /// The entry of one serial and its `aux`.
    pub(super) fn serial_with(&self, serial: &str) -> Option<(RevocationRecord, i64)> {
        if let Some(key) = SerialKey::parse(serial)
            && let Some(slot) = self.serials.get(&key)
        {
            return Some((self.record(&key, slot), slot.aux));
        }
        self.odd.get(serial).cloned()
    }

    /// The identity rule of one SPIFFE ID.
    pub(super) fn rule(&self, spiffe_id: &str) -> Option<RevocationRecord> {
        self.rules.get(spiffe_id).map(|(r, _)| r.clone())
    }

    /// The identity rule of one SPIFFE ID and its `aux`.
    pub(super) fn rule_with(&self, spiffe_id: &str) -> Option<&(RevocationRecord, i64)> {
        self.rules.get(spiffe_id)
    }

    /// Every identity rule.
    pub(super) fn rules(&self) -> Vec<RevocationRecord> {
        self.rules.values().map(|(r, _)| r.clone()).collect()
    }

    /// Every entry with `rev > since`, in rev order.
    pub(super) fn since(&self, since: u64) -> Vec<RevocationRecord> {
        self.range(since, u64::MAX)
    }

    /// Every entry with `after < rev <= through`, in rev order.
    pub(super) fn range(&self, after: u64, through: u64) -> Vec<RevocationRecord> {
        let from = self.log.partition_point(|(rev, _)| *rev <= after);
        let to = self.log.partition_point(|(rev, _)| *rev <= through);
        let mut out: Vec<RevocationRecord> = self.log[from..to.max(from)]
            .iter()
            .filter_map(|(rev, key)| {
                let slot = self.serials.get(key).filter(|s| s.rev == *rev)?;
                Some(self.record(key, slot))
            })
            .collect();
        let before = out.len();
        out.extend(
            self.odd
                .values()
                .chain(self.rules.values())
                .map(|(r, _)| r)
                .filter(|r| r.rev > after && r.rev <= through)
                .cloned(),
        );
        if out.len() > before {
            // A stable sort of a sorted run and a short tail: close to linear.
            out.sort_by_key(|r| r.rev);
        }
        out
    }

    /// Where a page of about `limit` live entries after rev `after` (`None`: from the start)
    /// ends: the index in `log` past it, and the last rev it covers (`u64::MAX` when it reaches
    /// the end, so the rare entries outside `log` go with the last page). A page ends on a whole
    /// revision, so the next one continues from its last rev without skipping any entry.
    fn page_end(&self, after: Option<u64>, limit: usize) -> (usize, usize, u64) {
        let from = after.map_or(0, |a| self.log.partition_point(|(rev, _)| *rev <= a));
        let mut live = 0;
        let mut to = from;
        while to < self.log.len() {
            let (rev, key) = &self.log[to];
            if live >= limit && self.log[to - 1].0 != *rev {
                return (from, to, self.log[to - 1].0);
            }
            if self.serials.get(key).is_some_and(|s| s.rev == *rev) {
                live += 1;
            }
            to += 1;
        }
        (from, to, u64::MAX)
    }

    /// About `limit` live entries with `rev > after`, in rev order, ending on a whole revision
    /// (see [`RevIndex::page_end`]); empty when none is left.
    pub(super) fn page(&self, after: u64, limit: usize) -> Vec<RevocationRecord> {
        let (_, _, through) = self.page_end(Some(after), limit);
        self.range(after, through)
    }

    /// Appends the next chunk of [`walk`] after rev `after` to `out`: serial entries in rev
    /// order, then, with the last chunk, the entries outside `log` and the identity rules.
    /// Returns where the next chunk starts; `None` after the last.
    fn briefs(&self, after: Option<u64>, out: &mut Vec<RevocationBrief>) -> Option<u64> {
        let (from, to, through) = self.page_end(after, CHUNK);
        for (rev, key) in &self.log[from..to] {
            if let Some(s) = self.serials.get(key).filter(|s| s.rev == *rev) {
                out.push(RevocationBrief::serial(
                    key.bytes(),
                    s.rev,
                    s.expires_at - i64::from(s.lead),
                    s.expires_at,
                    !self.strings.get(s.origin).is_empty(),
                ));
            }
        }
        if through != u64::MAX {
            return Some(through);
        }
        for (r, _) in self.odd.values().chain(self.rules.values()) {
            out.push(RevocationBrief::of(r));
        }
        None
    }

    /// Serials and identity rules (`true`) whose entry expired before `now`, with their `aux`.
    pub(super) fn expired(&self, now: i64) -> Vec<(bool, String, i64)> {
        let serials = self
            .serials
            .iter()
            .filter(|(_, s)| s.expires_at < now)
            .map(|(k, s)| (false, k.hex(), s.aux));
        let odd = self
            .odd
            .values()
            .filter(|(r, _)| r.expires_at < now)
            .map(|(r, aux)| (false, r.serial.clone(), *aux));
        let rules = self
            .rules
            .values()
            .filter(|(r, _)| r.expires_at < now)
            .map(|(r, aux)| (true, r.spiffe_id.clone(), *aux));
        serials.chain(odd).chain(rules).collect()
    }

    /// Serial entries (including relayed ones).
    pub(super) fn serial_count(&self) -> usize {
        self.serials.len() + self.odd.len()
    }

    /// Identity rules.
    pub(super) fn rule_count(&self) -> usize {
        self.rules.len()
    }

    fn record(&self, key: &SerialKey, s: &Slot) -> RevocationRecord {
        RevocationRecord {
            v: RECORD_VERSION,
            rev: s.rev,
            serial: key.hex(),
            spiffe_id: self.strings.get(s.spiffe_id).to_string(),
            identity_rule: false,
            before: 0,
            reason: self.strings.get(s.reason & !RENEWABLE).to_string(),
            revoked_at: s.expires_at - i64::from(s.lead),
            expires_at: s.expires_at,
            blocked: false,
            renewable: s.reason & RENEWABLE != 0,
            origin: self.strings.get(s.origin).to_string(),
        }
    }
}

/// Calls `f` with every live revocation, reading the index a chunk at a time through `read`
/// (which calls its argument with the locked index): a commit never waits for the whole
/// walk, and no more than a chunk is copied at once. An entry committed during the walk may or
/// may not be seen, but one commit's entries are seen all or none (a chunk ends on a whole
/// revision, and the entries outside the rev list come with the last chunk).
pub(super) fn walk(read: impl Fn(&mut dyn FnMut(&RevIndex)), f: &mut dyn FnMut(&RevocationBrief)) {
    let mut after = None;
    let mut chunk = Vec::with_capacity(CHUNK);
    loop {
        chunk.clear();
        let mut next = None;
        read(&mut |ix| next = ix.briefs(after, &mut chunk));
        chunk.iter().for_each(&mut *f);
        match next {
            Some(rev) => after = Some(rev),
            None => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serial(serial: &str, rev: u64, id: &str, expires_at: i64) -> RevocationRecord {
        RevocationRecord {
            v: RECORD_VERSION,
            rev,
            serial: serial.into(),
            spiffe_id: id.into(),
            identity_rule: false,
            before: 0,
            reason: "key leak".into(),
            revoked_at: 10,
            expires_at,
            blocked: false,
            renewable: rev % 2 == 0,
            origin: String::new(),
        }
    }

    #[test]
    fn entries_read_back_exactly_whatever_their_spelling() {
        let mut ix = RevIndex::default();
        let entries = [
            serial("01ab", 1, "spiffe://td/a", 100),
            // Not canonical hex: kept whole, still found by the same string.
            serial("01AB", 2, "spiffe://td/b", 100),
            serial("abc", 3, "spiffe://td/c", 100),
            RevocationRecord {
                before: 5,
                ..serial("02", 4, "spiffe://td/d", 100)
            },
            // Expiring before it was revoked (nonsense, but stored): kept whole, read back.
            RevocationRecord {
                revoked_at: 500,
                ..serial("03", 5, "spiffe://td/f", 100)
            },
            RevocationRecord {
                identity_rule: true,
                serial: String::new(),
                blocked: true,
                before: 7,
                ..serial("", 6, "spiffe://td/e", i64::MAX)
            },
        ];
        for e in &entries {
            ix.insert(e);
        }
        for e in &entries[..5] {
            assert_eq!(ix.serial(&e.serial).as_ref(), Some(e));
        }
        assert_eq!(ix.rule("spiffe://td/e").as_ref(), Some(&entries[5]));
        assert_eq!(ix.since(0), entries.to_vec());
        assert_eq!(ix.since(3), entries[3..].to_vec());
        assert_eq!(ix.range(1, 3), entries[1..3].to_vec());
        assert_eq!(ix.serial_count(), 5);
        assert!(ix.serial("01ac").is_none());
    }

    #[test]
    fn replaced_and_removed_entries_leave_nothing_behind() {
        let mut ix = RevIndex::default();
        ix.insert(&serial("0a", 1, "spiffe://td/a", 100));
        ix.insert(&serial("0b", 2, "spiffe://td/a", 200));
        ix.insert(&serial("0a", 3, "spiffe://td/b", 300));
        assert_eq!(
            ix.since(0).iter().map(|r| r.rev).collect::<Vec<_>>(),
            vec![2, 3]
        );
        assert_eq!(ix.serial("0a").unwrap().spiffe_id, "spiffe://td/b");
        assert_eq!(ix.expired(250), vec![(false, "0b".to_string(), 0)]);
        assert!(ix.remove_serial("0b"));
        assert!(!ix.remove_serial("0b"));
        assert!(ix.remove_serial("0a"));
        assert!(ix.since(0).is_empty());
        // Every interned string was released and its id reused.
        assert!(ix.strings.ids.is_empty());
        // In bulk, in any order.
        let mut bulk = RevIndex::default();
        bulk.start_load();
        for i in [3u64, 1, 2] {
            bulk.insert(&serial(&format!("0{i}"), i, "spiffe://td/a", 100));
        }
        bulk.finish_load();
        assert_eq!(
            bulk.since(1).iter().map(|r| r.rev).collect::<Vec<_>>(),
            vec![2, 3]
        );
        // Out of rev order (a tool's commit without audit records) still reads in order.
        ix.insert(&serial("0c", 9, "spiffe://td/a", 100));
        ix.insert(&serial("0d", 5, "spiffe://td/a", 100));
        assert_eq!(
            ix.since(0).iter().map(|r| r.rev).collect::<Vec<_>>(),
            vec![5, 9]
        );
    }

    /// Pages and the chunked walk see every live entry once, never split a revision, and bring
    /// the entries outside the rev list (odd spellings, identity rules) with the last one.
    #[test]
    fn pages_and_walks_cover_everything_once_in_whole_revisions() {
        let mut ix = RevIndex::default();
        let mut n = 0u32;
        // 3 revisions of CHUNK + 7 entries each, and one of 5, then a replaced and a removed
        // entry (stale items in the rev list), an odd spelling and a rule.
        for (rev, count) in [(1u64, CHUNK + 7), (2, CHUNK + 7), (3, CHUNK + 7), (4, 5)] {
            for _ in 0..count {
                n += 1;
                ix.insert(&serial(&format!("{n:08x}"), rev, "spiffe://td/a", 100));
            }
        }
        ix.insert(&serial("00000001", 5, "spiffe://td/b", 100));
        assert!(ix.remove_serial("00000002"));
        ix.insert(&serial("0ABC", 6, "spiffe://td/c", 100));
        let rule = RevocationRecord {
            identity_rule: true,
            serial: String::new(),
            blocked: true,
            before: 7,
            ..serial("", 7, "spiffe://td/e", i64::MAX)
        };
        ix.insert(&rule);
        let all = ix.since(0);
        assert_eq!(all.len(), n as usize - 1 + 2);

        let mut paged = Vec::new();
        let mut sent = 0;
        loop {
            let page = ix.page(sent, 1000);
            let Some(last) = page.last() else { break };
            // A page never ends inside a revision.
            assert!(ix.since(last.rev).iter().all(|r| r.rev > last.rev));
            sent = last.rev;
            paged.extend(page);
        }
        assert_eq!(paged, all);

        // Compared with leading zero bytes dropped: the walk hands out the stored bytes, and
        // a CRL's INTEGER drops them anyway.
        let norm = |b: &RevocationBrief| {
            let serial = b.serial_bytes().map(|s| {
                s.iter()
                    .skip_while(|x| **x == 0)
                    .copied()
                    .collect::<Vec<u8>>()
            });
            (
                b.rev,
                serial,
                b.revoked_at,
                b.expires_at,
                b.identity_rule,
                b.relayed,
            )
        };
        let mut walked = Vec::new();
        walk(|g| g(&ix), &mut |b| walked.push(*b));
        let mut got: Vec<_> = walked.iter().map(norm).collect();
        let mut expected: Vec<_> = all.iter().map(|r| norm(&RevocationBrief::of(r))).collect();
        got.sort();
        expected.sort();
        assert_eq!(got, expected);
        assert_eq!(walked.iter().filter(|b| b.identity_rule).count(), 1);
        let odd = walked.iter().find(|b| b.rev == 6).unwrap();
        assert_eq!(odd.serial_bytes(), Some(&[0x0a, 0xbc][..]));
    }
}
