//! The in-memory revocation index: every live revocation, so `Revocation.Check`, the mTLS
//! revocation check of every authenticated call, `Revocation.Watch` and the CRL never read the
//! database. The sled backend keeps it in step inside [`super::Store::commit`] and
//! [`super::Store::prune`] and rebuilds it at open; the etcd backend keeps it as part of its
//! mirror, applying every replica's commits from its watch, and reloads it at start.
//!
//! Each entry carries one `aux` number for the backend: etcd keeps the key's mod revision there
//! (its prune and guards compare it); sled keeps 0 (1 for an entry still under the hex key of an
//! earlier release).
//!
//! Sized for a million serial entries in about 72 bytes each: the entries sit in one vector in
//! rev order (64 bytes each: the serial as its bytes, not hex, and the identity, reason and
//! origin strings interned once however many entries share them), so "everything after rev N"
//! is a binary search, and a hash table of 4-byte positions into it finds a serial. A replaced
//! or removed entry is marked dead in place and the vector is compacted once they are many.
//!
//! The interned strings' numbers are also what the sled backend writes on disk (a compact
//! serial record names its identity, reason and origin by number; see
//! [`CompactRevocation`]): the index hands out the numbers, says which are not on disk yet
//! ([`RevIndex::unstored`]) and which freed ones the backend may delete
//! ([`RevIndex::take_dropped`]).

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

use super::records::CompactRevocation;
use super::{RECORD_VERSION, RevocationBrief, RevocationRecord};

/// Live entries one lock of the index hands out to [`walk`] or [`RevIndex::page`]: a commit
/// waits for at most this many copies, however many entries the index holds.
pub(super) const CHUNK: usize = 4096;

/// A serial in canonical lowercase hex, kept as its bytes: `[len, bytes.., 0 padding]`. A
/// length of 0 marks a dead [`Entry`].
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

    /// The key of a serial's 1 to 20 bytes (what [`SerialKey::parse`] makes of their hex).
    fn of_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.is_empty() || bytes.len() > 20 {
            return None;
        }
        let mut k = [0u8; 21];
        k[0] = bytes.len() as u8;
        k[1..=bytes.len()].copy_from_slice(bytes);
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

/// A serial entry, its strings interned: 64 bytes.
#[derive(Clone, Copy)]
struct Entry {
    rev: u64,
    aux: i64,
    expires_at: i64,
    /// `expires_at - revoked_at` (an entry where that does not fit is kept whole).
    lead: u32,
    spiffe_id: u32,
    /// The interned reason, and [`RENEWABLE`] when the holder may still renew.
    reason: u32,
    origin: u32,
    key: SerialKey,
}

impl Entry {
    fn live(&self) -> bool {
        self.key.0[0] != 0
    }
}

/// The `renewable` flag, in [`Entry::reason`]'s top bit.
pub(super) const RENEWABLE: u32 = 1 << 31;

/// Interned string numbers stay below this (a number read from disk above it is corrupt): far
/// more distinct strings than any CA's memory holds.
const MAX_STRING_ID: u32 = 1 << 28;

/// One interned string.
struct Str {
    s: Arc<str>,
    refs: u32,
    /// The backend holds this string under its number (sled's string rows).
    stored: bool,
}

/// Strings shared by many entries, reference-counted so pruned ones are freed.
#[derive(Default)]
struct Interner {
    ids: HashMap<Arc<str>, u32>,
    strs: Vec<Str>,
    free: Vec<u32>,
    /// Freed numbers whose string the backend may still hold (see [`RevIndex::take_dropped`]).
    dropped: Vec<u32>,
}

impl Interner {
    fn intern(&mut self, s: &str) -> u32 {
        if let Some(&id) = self.ids.get(s) {
            self.strs[id as usize].refs += 1;
            return id;
        }
        let s: Arc<str> = Arc::from(s);
        let fresh = Str {
            s: s.clone(),
            refs: 1,
            stored: false,
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.strs[id as usize] = fresh;
                id
            }
            None => {
                self.strs.push(fresh);
                // Below 2^31: the top bit of an id in an entry is a flag. (2^31 distinct strings
                // would take far more memory than any CA has.)
                ((self.strs.len() - 1) as u32) & !RENEWABLE
            }
        };
        self.ids.insert(s, id);
        id
    }

    /// Takes one more reference to a string already interned (a number read from disk);
    /// `false` when there is no such string.
    fn acquire(&mut self, id: u32) -> bool {
        match self.strs.get_mut(id as usize) {
            Some(s) if s.refs > 0 || s.stored => {
                s.refs += 1;
                true
            }
            _ => false,
        }
    }

    fn release(&mut self, id: u32) {
        let Some(entry) = self.strs.get_mut(id as usize).filter(|e| e.refs > 0) else {
            return;
        };
        entry.refs -= 1;
        if entry.refs == 0 {
            if self.ids.get(&*entry.s) == Some(&id) {
                self.ids.remove(&*entry.s);
            }
            entry.s = Arc::from("");
            if entry.stored {
                entry.stored = false;
                self.dropped.push(id);
            }
            self.free.push(id);
        }
    }

    /// A string the backend holds under `id` (read at open, before the entries naming it).
    fn load(&mut self, id: u32, s: &str) -> bool {
        if id >= MAX_STRING_ID {
            return false;
        }
        let at = id as usize;
        while self.strs.len() <= at {
            self.strs.push(Str {
                s: Arc::from(""),
                refs: 0,
                stored: false,
            });
        }
        let s: Arc<str> = Arc::from(s);
        self.ids.entry(s.clone()).or_insert(id);
        self.strs[at] = Str {
            s,
            refs: 0,
            stored: true,
        };
        true
    }

    /// After a load: frees every string no entry names (a row a crash left behind), and lists
    /// the free numbers.
    fn finish_load(&mut self) {
        self.free.clear();
        self.ids.clear();
        for id in (0..self.strs.len()).rev() {
            let entry = &mut self.strs[id];
            if entry.refs == 0 {
                if entry.stored {
                    entry.stored = false;
                    self.dropped.push(id as u32);
                }
                entry.s = Arc::from("");
                self.free.push(id as u32);
            } else {
                self.ids.entry(entry.s.clone()).or_insert(id as u32);
            }
        }
    }

    fn get(&self, id: u32) -> &str {
        self.strs.get(id as usize).map_or("", |e| &e.s)
    }
}

/// Where the live serial entries sit in [`RevIndex::entries`], by serial: open addressing with
/// linear probing over 4-byte positions, at most 7/8 full.
#[derive(Default)]
struct Table {
    slots: Vec<u32>,
    len: usize,
    hasher: RandomState,
}

/// An empty [`Table`] slot.
const EMPTY: u32 = u32::MAX;

impl Table {
    fn home(&self, key: &SerialKey) -> usize {
        (self.hasher.hash_one(key.0) as usize) & (self.slots.len() - 1)
    }

    /// The slot holding `key`, or the empty slot where it would go.
    fn probe(&self, entries: &[Entry], key: &SerialKey) -> Result<usize, usize> {
        if self.slots.is_empty() {
            return Err(0);
        }
        let mask = self.slots.len() - 1;
        let mut i = self.home(key);
        loop {
            match self.slots[i] {
                EMPTY => return Err(i),
                pos if entries[pos as usize].key == *key => return Ok(i),
                _ => i = (i + 1) & mask,
            }
        }
    }

    fn find(&self, entries: &[Entry], key: &SerialKey) -> Option<usize> {
        self.probe(entries, key).ok()
    }

    /// Makes room for one more position, rebuilding from `entries` when the table grows.
    fn reserve_one(&mut self, entries: &[Entry]) {
        if (self.len + 1) * 8 > self.slots.len() * 7 {
            self.rebuild(entries, self.len + 1);
        }
    }

    /// Adds the position of a live entry not yet in the table (after [`Table::reserve_one`]).
    fn insert(&mut self, entries: &[Entry], pos: usize) {
        if let Err(i) = self.probe(entries, &entries[pos].key) {
            self.slots[i] = pos as u32;
            self.len += 1;
        }
    }

    /// Empties slot `i`, moving later entries of its run back (no tombstones).
    fn remove(&mut self, entries: &[Entry], mut i: usize) {
        let mask = self.slots.len() - 1;
        let mut j = i;
        loop {
            j = (j + 1) & mask;
            let pos = self.slots[j];
            if pos == EMPTY {
                break;
            }
            let k = self.home(&entries[pos as usize].key);
            // The entry at j stays if its home lies cyclically in (i, j].
            let stays = if i <= j {
                i < k && k <= j
            } else {
                i < k || k <= j
            };
            if !stays {
                self.slots[i] = pos;
                i = j;
            }
        }
        self.slots[i] = EMPTY;
        self.len -= 1;
    }

    /// Every live entry's position, in a table sized for `want` of them. A serial found twice
    /// (a bulk load) keeps its later entry; the earlier one's position is returned to be
    /// marked dead.
    fn rebuild(&mut self, entries: &[Entry], want: usize) -> Vec<usize> {
        let cap = (want.max(8) * 8 / 7 + 1).next_power_of_two();
        self.slots = vec![EMPTY; cap];
        self.len = 0;
        let mut twice = Vec::new();
        for (pos, e) in entries.iter().enumerate() {
            if !e.live() {
                continue;
            }
            match self.probe(entries, &e.key) {
                Ok(i) => {
                    twice.push(self.slots[i] as usize);
                    self.slots[i] = pos as u32;
                }
                Err(i) => {
                    self.slots[i] = pos as u32;
                    self.len += 1;
                }
            }
        }
        twice
    }
}

/// Every live revocation, in memory (see the module documentation).
#[derive(Default)]
pub(super) struct RevIndex {
    /// Serial entries in rev order (while not loading), dead ones included until compacted.
    entries: Vec<Entry>,
    table: Table,
    dead: usize,
    /// Serial entries that do not fit an [`Entry`] (an unusual serial spelling, a field a
    /// serial entry does not normally set, another record version): rare, kept whole.
    odd: HashMap<String, (RevocationRecord, i64)>,
    /// Identity rules by SPIFFE ID, with their `aux`: few.
    rules: HashMap<String, (RevocationRecord, i64)>,
    /// Loading in bulk (in key order, not rev order): `entries` is sorted and the table built
    /// once at the end.
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
        match self.reserve(r) {
            Some((serial, c)) => self.insert_reserved(&serial, &c, aux),
            None => {
                // One serial lives in one place: a replacement may move it between the two.
                self.remove_serial(&r.serial);
                self.odd.insert(r.serial.clone(), (r.clone(), aux));
            }
        }
    }

    /// For a serial entry that fits the compact form: its serial's bytes, and the entry with
    /// its strings interned (one reference each, held until [`RevIndex::insert_reserved`] or
    /// [`RevIndex::release_reserved`]). `None` for an identity rule or an entry kept whole.
    pub(super) fn reserve(&mut self, r: &RevocationRecord) -> Option<(Vec<u8>, CompactRevocation)> {
        if r.identity_rule || r.v != RECORD_VERSION || r.before != 0 || r.blocked {
            return None;
        }
        let lead = u32::try_from(r.expires_at.checked_sub(r.revoked_at)?).ok()?;
        let key = SerialKey::parse(&r.serial)?;
        let reason = self.strings.intern(&r.reason);
        let c = CompactRevocation {
            rev: r.rev,
            expires_at: r.expires_at,
            lead,
            spiffe_id: self.strings.intern(&r.spiffe_id),
            reason: reason | if r.renewable { RENEWABLE } else { 0 },
            origin: self.strings.intern(&r.origin),
        };
        Some((key.bytes().to_vec(), c))
    }

    /// Gives back what [`RevIndex::reserve`] took, for an entry that was not written.
    pub(super) fn release_reserved(&mut self, c: &CompactRevocation) {
        for id in [c.spiffe_id, c.reason & !RENEWABLE, c.origin] {
            self.strings.release(id);
        }
    }

    /// The interned strings of `c` the backend does not hold yet, with their numbers.
    pub(super) fn unstored(&self, c: &CompactRevocation) -> Vec<(u32, Arc<str>)> {
        [c.spiffe_id, c.reason & !RENEWABLE, c.origin]
            .into_iter()
            .filter_map(|id| {
                let s = self.strings.strs.get(id as usize)?;
                (!s.stored).then(|| (id, s.s.clone()))
            })
            .collect()
    }

    /// Notes that the backend now holds string `id` (written with an entry naming it).
    pub(super) fn mark_stored(&mut self, id: u32) {
        if let Some(s) = self.strings.strs.get_mut(id as usize)
            && s.refs > 0
        {
            s.stored = true;
        }
    }

    /// A string the backend holds under `id`, read at open before the entries naming it;
    /// `false` for a number no index hands out (a corrupt row).
    pub(super) fn load_string(&mut self, id: u32, s: &str) -> bool {
        self.strings.load(id, s)
    }

    /// Adds an entry read from the backend in compact form, naming strings loaded with
    /// [`RevIndex::load_string`]; `false` (nothing added) when a string or the serial is
    /// missing.
    pub(super) fn insert_loaded(&mut self, serial: &[u8], c: &CompactRevocation, aux: i64) -> bool {
        if SerialKey::of_bytes(serial).is_none() {
            return false;
        }
        let ids = [c.spiffe_id, c.reason & !RENEWABLE, c.origin];
        for (n, id) in ids.iter().enumerate() {
            if !self.strings.acquire(*id) {
                for taken in &ids[..n] {
                    self.strings.release(*taken);
                }
                return false;
            }
        }
        self.insert_reserved(serial, c, aux);
        true
    }

    /// Freed string numbers the backend may still hold and can now delete.
    pub(super) fn take_dropped(&mut self) -> Vec<u32> {
        let mut ids = std::mem::take(&mut self.strings.dropped);
        ids.retain(|id| {
            self.strings
                .strs
                .get(*id as usize)
                .is_some_and(|s| s.refs == 0 && !s.stored)
        });
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Adds or replaces the serial entry `c` of `serial` (its bytes), whose strings
    /// [`RevIndex::reserve`] took.
    pub(super) fn insert_reserved(&mut self, serial: &[u8], c: &CompactRevocation, aux: i64) {
        let Some(key) = SerialKey::of_bytes(serial) else {
            self.release_reserved(c);
            return;
        };
        if !self.odd.is_empty() {
            self.odd.remove(&key.hex());
        }
        let entry = Entry {
            rev: c.rev,
            aux,
            expires_at: c.expires_at,
            lead: c.lead,
            spiffe_id: c.spiffe_id,
            reason: c.reason,
            origin: c.origin,
            key,
        };
        if self.loading {
            self.entries.push(entry);
            return;
        }
        match self.table.find(&self.entries, &key) {
            Some(slot) => {
                let old = self.table.slots[slot] as usize;
                self.kill(old);
                let pos = self.place(entry);
                self.table.slots[slot] = pos as u32;
            }
            None => {
                self.table.reserve_one(&self.entries);
                let pos = self.place(entry);
                self.table.insert(&self.entries, pos);
            }
        }
        self.compact_if_sparse();
    }

    /// Puts `e` into `entries` in rev order; returns its position. Commits arrive in rev order;
    /// only out-of-order writes (tests, tools) pay an insert and a pass over the table.
    fn place(&mut self, e: Entry) -> usize {
        if self.entries.last().is_none_or(|l| l.rev <= e.rev) {
            self.entries.push(e);
            return self.entries.len() - 1;
        }
        let at = self.entries.partition_point(|x| x.rev <= e.rev);
        self.entries.insert(at, e);
        for s in &mut self.table.slots {
            if *s != EMPTY && *s as usize >= at {
                *s += 1;
            }
        }
        at
    }

    /// Marks the entry at `pos` dead and releases its strings (its table slot is the caller's).
    fn kill(&mut self, pos: usize) {
        let e = &mut self.entries[pos];
        if !e.live() {
            return;
        }
        e.key.0[0] = 0;
        let ids = [e.spiffe_id, e.reason & !RENEWABLE, e.origin];
        for id in ids {
            self.strings.release(id);
        }
        self.dead += 1;
    }

    /// Drops the dead entries once they are many (and half or more of all).
    fn compact_if_sparse(&mut self) {
        if self.dead > 4096 && self.dead * 2 > self.entries.len() {
            self.entries.retain(Entry::live);
            if self.entries.capacity() > 2 * self.entries.len() {
                self.entries.shrink_to_fit();
            }
            self.dead = 0;
            self.table.rebuild(&self.entries, self.entries.len());
        }
    }

    /// Starts a bulk load: entries may come in any order until [`RevIndex::finish_load`].
    pub(super) fn start_load(&mut self) {
        self.loading = true;
    }

    /// Ends a bulk load: puts the entries in rev order, builds the table (a serial loaded twice
    /// keeps its later entry), and frees the strings no entry names.
    pub(super) fn finish_load(&mut self) {
        if !self.loading {
            return;
        }
        self.loading = false;
        self.entries.sort_by_key(|e| e.rev);
        let live = self.entries.iter().filter(|e| e.live()).count();
        for pos in self.table.rebuild(&self.entries, live) {
            self.kill(pos);
        }
        self.compact_if_sparse();
        self.strings.finish_load();
    }

    /// Removes a serial entry; whether there was one.
    pub(super) fn remove_serial(&mut self, serial: &str) -> bool {
        if self.loading {
            // Removals are not expected during a load; keep the entries exact anyway.
            self.finish_load();
            self.loading = true;
        }
        if let Some(key) = SerialKey::parse(serial)
            && let Some(slot) = self.table.find(&self.entries, &key)
        {
            let pos = self.table.slots[slot] as usize;
            self.kill(pos);
            self.table.remove(&self.entries, slot);
            self.compact_if_sparse();
            return true;
        }
        self.odd.remove(serial).is_some()
    }

    /// Removes an identity rule; whether there was one.
    pub(super) fn remove_rule(&mut self, spiffe_id: &str) -> bool {
        self.rules.remove(spiffe_id).is_some()
    }

    fn live_entry(&self, serial: &str) -> Option<&Entry> {
        let key = SerialKey::parse(serial)?;
        let slot = self.table.find(&self.entries, &key)?;
        Some(&self.entries[self.table.slots[slot] as usize])
    }

    /// The entry of one serial (hex, as stored).
    pub(super) fn serial(&self, serial: &str) -> Option<RevocationRecord> {
        self.serial_with(serial).map(|(r, _)| r)
    }

    /// The entry of one serial and its `aux`.
    pub(super) fn serial_with(&self, serial: &str) -> Option<(RevocationRecord, i64)> {
        if let Some(e) = self.live_entry(serial) {
            return Some((self.record(e), e.aux));
        }
        self.odd.get(serial).cloned()
    }

    /// The `aux` of one serial's entry, without building its record.
    pub(super) fn serial_aux(&self, serial: &str) -> Option<i64> {
        match self.live_entry(serial) {
            Some(e) => Some(e.aux),
            None => self.odd.get(serial).map(|(_, aux)| *aux),
        }
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
        let from = self.entries.partition_point(|e| e.rev <= after);
        let to = self.entries.partition_point(|e| e.rev <= through);
        let mut out: Vec<RevocationRecord> = self.entries[from..to.max(from)]
            .iter()
            .filter(|e| e.live())
            .map(|e| self.record(e))
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
    /// ends: the positions in `entries` it spans, and the last rev it covers (`u64::MAX` when
    /// it reaches the end, so the rare entries outside `entries` go with the last page). A page
    /// ends on a whole revision, so the next one continues from its last rev without skipping
    /// any entry.
    fn page_end(&self, after: Option<u64>, limit: usize) -> (usize, usize, u64) {
        let from = after.map_or(0, |a| self.entries.partition_point(|e| e.rev <= a));
        let mut live = 0;
        let mut to = from;
        while to < self.entries.len() {
            let e = &self.entries[to];
            if live >= limit && self.entries[to - 1].rev != e.rev {
                return (from, to, self.entries[to - 1].rev);
            }
            live += usize::from(e.live());
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
    /// order, then, with the last chunk, the entries outside `entries` and the identity rules.
    /// Returns where the next chunk starts; `None` after the last.
    fn briefs(&self, after: Option<u64>, out: &mut Vec<RevocationBrief>) -> Option<u64> {
        let (from, to, through) = self.page_end(after, CHUNK);
        for e in self.entries[from..to].iter().filter(|e| e.live()) {
            out.push(RevocationBrief::serial(
                e.key.bytes(),
                e.rev,
                e.expires_at - i64::from(e.lead),
                e.expires_at,
                !self.strings.get(e.origin).is_empty(),
            ));
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
            .entries
            .iter()
            .filter(|e| e.live() && e.expires_at < now)
            .map(|e| (false, e.key.hex(), e.aux));
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
        self.entries.len() - self.dead + self.odd.len()
    }

    /// Identity rules.
    pub(super) fn rule_count(&self) -> usize {
        self.rules.len()
    }

    /// The compact form of every live serial entry, with its serial's bytes (what compaction
    /// and tests compare against the disk).
    #[cfg(test)]
    pub(super) fn compact_entries(&self) -> Vec<(Vec<u8>, CompactRevocation)> {
        self.entries
            .iter()
            .filter(|e| e.live())
            .map(|e| {
                let c = CompactRevocation {
                    rev: e.rev,
                    expires_at: e.expires_at,
                    lead: e.lead,
                    spiffe_id: e.spiffe_id,
                    reason: e.reason,
                    origin: e.origin,
                };
                (e.key.bytes().to_vec(), c)
            })
            .collect()
    }

    fn record(&self, e: &Entry) -> RevocationRecord {
        RevocationRecord {
            v: RECORD_VERSION,
            rev: e.rev,
            serial: e.key.hex(),
            spiffe_id: self.strings.get(e.spiffe_id).to_string(),
            identity_rule: false,
            before: 0,
            reason: self.strings.get(e.reason & !RENEWABLE).to_string(),
            revoked_at: e.expires_at - i64::from(e.lead),
            expires_at: e.expires_at,
            blocked: false,
            renewable: e.reason & RENEWABLE != 0,
            origin: self.strings.get(e.origin).to_string(),
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

    fn serial_entry(hex: &str, rev: u64, id: &str, expires_at: i64) -> RevocationRecord {
        serial(hex, rev, id, expires_at)
    }

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

    /// The table and the rev-ordered entries agree with a plain map through many inserts,
    /// replacements (some out of rev order), removals and compactions.
    #[test]
    fn lookups_and_order_match_a_plain_map_through_churn() {
        let mut ix = RevIndex::default();
        let mut model: HashMap<String, RevocationRecord> = HashMap::new();
        // A fixed xorshift sequence: the same churn every run.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut rev = 0u64;
        for round in 0..60_000u64 {
            let n = next();
            let serial = format!("{:06x}", n % 20_000);
            match n % 8 {
                0..=4 => {
                    // Mostly in rev order; now and then an older rev (a tool's write).
                    rev += 1;
                    let r = if round % 97 == 0 { rev / 2 + 1 } else { rev };
                    let id = format!("spiffe://td/w{}", n % 300);
                    let e = serial_entry(&serial, r, &id, 100 + (n % 50) as i64);
                    ix.insert(&e);
                    model.insert(serial, e);
                }
                _ => {
                    assert_eq!(ix.remove_serial(&serial), model.remove(&serial).is_some());
                }
            }
            if round % 5_000 == 0 {
                for probe in 0..20_000u64 {
                    let s = format!("{probe:06x}");
                    assert_eq!(
                        ix.serial(&s).as_ref(),
                        model.get(&s),
                        "{s} at round {round}"
                    );
                }
            }
        }
        assert_eq!(ix.serial_count(), model.len());
        let mut expected: Vec<RevocationRecord> = model.values().cloned().collect();
        expected.sort_by_key(|r| r.rev);
        let got = ix.since(0);
        assert_eq!(
            got.iter().map(|r| r.rev).collect::<Vec<_>>(),
            expected.iter().map(|r| r.rev).collect::<Vec<_>>()
        );
        let mut got_sorted = got.clone();
        got_sorted.sort_by(|a, b| a.serial.cmp(&b.serial));
        expected.sort_by(|a, b| a.serial.cmp(&b.serial));
        assert_eq!(got_sorted, expected);
        // Removing everything frees every string and leaves an empty table.
        for s in model.keys() {
            assert!(ix.remove_serial(s));
        }
        assert_eq!(ix.serial_count(), 0);
        assert!(ix.since(0).is_empty());
        assert!(ix.strings.ids.is_empty());
    }

    /// A string's number is written once (unstored until marked), is kept while an entry
    /// names it, and is offered for deletion only once freed; a load from numbers (as sled
    /// reads them back) rebuilds the same entries and frees strings nobody names.
    #[test]
    fn string_numbers_follow_the_entries_that_name_them() {
        let mut ix = RevIndex::default();
        let a = serial_entry("0a", 1, "spiffe://td/a", 100);
        let (serial, c) = ix.reserve(&a).unwrap();
        let fresh = ix.unstored(&c);
        assert_eq!(fresh.len(), 3, "identity, reason and origin");
        ix.insert_reserved(&serial, &c, 0);
        for (id, _) in &fresh {
            ix.mark_stored(*id);
        }
        let b = serial_entry("0b", 2, "spiffe://td/a", 100);
        let (serial_b, cb) = ix.reserve(&b).unwrap();
        assert!(
            ix.unstored(&cb).is_empty(),
            "every string is on disk already"
        );
        assert_eq!(cb.spiffe_id, c.spiffe_id);
        // A failed commit gives its references back: nothing freed, a's strings stay.
        ix.release_reserved(&cb);
        assert!(ix.take_dropped().is_empty());
        let (_, cb) = ix.reserve(&b).unwrap();
        ix.insert_reserved(&serial_b, &cb, 0);
        assert!(ix.remove_serial("0a"));
        assert!(ix.take_dropped().is_empty(), "0b still names them");
        assert!(ix.remove_serial("0b"));
        let mut dropped = ix.take_dropped();
        let mut ids: Vec<u32> = fresh.iter().map(|(id, _)| *id).collect();
        dropped.sort_unstable();
        ids.sort_unstable();
        assert_eq!(dropped, ids);

        // Loading: strings by number (one nobody names), then entries naming them.
        let mut loaded = RevIndex::default();
        loaded.start_load();
        assert!(loaded.load_string(7, "spiffe://td/z"));
        assert!(loaded.load_string(2, "key leak"));
        assert!(loaded.load_string(0, ""));
        assert!(loaded.load_string(9, "orphan"));
        assert!(!loaded.load_string(u32::MAX >> 1, "too far"));
        let c = CompactRevocation {
            rev: 4,
            expires_at: 100,
            lead: 90,
            spiffe_id: 7,
            reason: 2 | RENEWABLE,
            origin: 0,
        };
        assert!(loaded.insert_loaded(&[0x0c], &c, 0));
        assert!(!loaded.insert_loaded(&[0x0d], &CompactRevocation { spiffe_id: 8, ..c }, 0));
        loaded.finish_load();
        let r = loaded.serial("0c").unwrap();
        assert_eq!(
            (
                r.spiffe_id.as_str(),
                r.reason.as_str(),
                r.renewable,
                r.revoked_at
            ),
            ("spiffe://td/z", "key leak", true, 10)
        );
        assert!(loaded.serial("0d").is_none());
        assert_eq!(loaded.take_dropped(), vec![9], "the orphan row goes");
        // New strings take free numbers, never one an entry names.
        let (_, c2) = loaded
            .reserve(&serial_entry("0e", 5, "spiffe://td/new", 100))
            .unwrap();
        assert!(![0, 2, 7].contains(&c2.spiffe_id));
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
