//! [`RevocationSet`]: revocations known to a workload, fed live from the CA's `Revocation.Watch`
//! stream by [`RevocationSet::follow`]; the mTLS verifiers consult it on every handshake.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use tokio::sync::watch;
use tracing::{debug, error, info, warn};

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
/// The most recent inserts held before they are merged into a table on disk. Smaller than
/// [`MERGE_MAX`]: the map and its sorted copy at a merge are the set's largest transient heap
/// blocks, and once glibc has raised its mmap threshold (the agent's CRL decode does) the heap
/// keeps its high-water mark (a million inserts left 6.4 MiB more anonymous memory at 64 Ki,
/// 1.8 MiB at 16 Ki, for ~4x the rewrites).
const MERGE_MAX_DISK: usize = 16 * 1024;

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

/// Revoked serials, sized for a million: Lanyard-shaped serials in a sorted table of 24-octet
/// slots (looked up by binary search) fed through a small hash map of recent inserts, merged
/// in when it reaches an eighth of the table (between [`MERGE_MIN`] and [`MERGE_MAX`], or
/// [`MERGE_MAX_DISK`] for a table on disk), so a catch-up of a million inserts moves each slot
/// a few times, not once per insert. Serials of any other shape (another CA's, relayed) are
/// kept as they are in a map of their own. With a [`Spill`] directory, a table of [`SPILL_AT`]
/// slots or more is kept on disk (decision 118).
#[derive(Debug, Default)]
struct Serials {
    /// Sorted by serial, no repeats; disjoint from `recent`.
    table: Table,
    recent: HashMap<[u8; 16], Meta>,
    other: HashMap<Box<[u8]>, Meta>,
    tags: Vec<Tag>,
    tag_ids: HashMap<Tag, u32>,
    /// The tag interned last: consecutive entries mostly share theirs.
    last_tag: Option<u32>,
    /// Where a large table goes; `None`: always in memory (what library users get).
    spill: Option<Spill>,
}

/// Slots in one block of a table on disk: 170 × 24 = 4,080 octets, padded to a 4 KiB page, so
/// a lookup reads one page of the page cache (and at most one from the disk).
const BLOCK_SLOTS: usize = 170;
/// A block's size on disk.
const BLOCK_BYTES: usize = 4096;
/// A slot's size on disk: serial, then expiry and tag as little-endian `u32`s.
const SLOT_BYTES: usize = 24;
/// A table this large (1.5 MB) or larger goes to disk when the set has a directory for it.
const SPILL_AT: usize = 64 * 1024;
/// Blocks read at a time when a table on disk is streamed (a merge, a sweep, the digest): 64
/// KiB, small enough not to raise the heap's high-water mark.
const STREAM_BLOCKS: usize = 16;

/// Why a table could not be written to or read from disk. The set then keeps its table in
/// memory (or, if it cannot read the old one either, keeps the old one and its recent map).
#[derive(Debug, thiserror::Error)]
enum TableError {
    /// The unlinked file for a new table could not be created in the spill directory.
    #[error("cannot create a revocation table in {dir}: {source}")]
    Create {
        dir: PathBuf,
        source: std::io::Error,
    },
    /// Writing a new table failed (a full disk, an I/O error).
    #[error("cannot write the revocation table: {0}")]
    Write(std::io::Error),
    /// Reading the table on disk failed.
    #[error("cannot read the revocation table: {0}")]
    Read(std::io::Error),
}

/// The directory a large table goes to, and when to try again after it failed.
#[derive(Debug)]
struct Spill {
    dir: PathBuf,
    /// Tables of at least this many slots go to disk ([`SPILL_AT`]; tests use less).
    at: usize,
    /// After a failure, the table size (slots) at which to try again: twice what it was, so a
    /// full disk is not written to the brim at every merge.
    retry_at: usize,
    /// The last failure, logged as a warning once and at debug level while it repeats.
    last_error: Option<String>,
}

/// The sorted table of slots: in memory, or in an unlinked file with a sparse index.
#[derive(Debug)]
enum Table {
    Memory(Vec<Slot>),
    Disk(DiskTable),
}

/// A table in an unlinked file: blocks of [`BLOCK_SLOTS`] slots, each at a 4 KiB boundary, and
/// in memory only the first serial of each block (~94 KB at a million). Read with `pread`, not
/// mapped: page cache that is read is not in the process's RSS, and the kernel reclaims it.
#[derive(Debug)]
struct DiskTable {
    file: File,
    len: usize,
    /// The first serial of each block.
    firsts: Vec<[u8; 16]>,
}

/// Where a rewritten table goes as it is streamed out.
enum Sink {
    Memory(Vec<Slot>),
    Disk(DiskWriter),
}

/// A table being written to a new unlinked file.
struct DiskWriter {
    out: BufWriter<File>,
    len: usize,
    firsts: Vec<[u8; 16]>,
}

// === impl Slot ===

impl Slot {
    fn encode(&self) -> [u8; SLOT_BYTES] {
        let mut b = [0u8; SLOT_BYTES];
        b[..16].copy_from_slice(&self.serial);
        b[16..20].copy_from_slice(&self.meta.expires.to_le_bytes());
        b[20..].copy_from_slice(&self.meta.tag.to_le_bytes());
        b
    }

    fn decode(b: &[u8; SLOT_BYTES]) -> Self {
        let mut serial = [0u8; 16];
        serial.copy_from_slice(&b[..16]);
        let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Self {
            serial,
            meta: Meta {
                expires: word(16),
                tag: word(20),
            },
        }
    }
}

// === impl Table ===

impl Default for Table {
    fn default() -> Self {
        Self::Memory(Vec::new())
    }
}

impl Table {
    fn len(&self) -> usize {
        match self {
            Self::Memory(v) => v.len(),
            Self::Disk(d) => d.len,
        }
    }

    fn get(&self, key: &[u8; 16]) -> Result<Option<Meta>, TableError> {
        match self {
            Self::Memory(v) => Ok(v
                .binary_search_by(|s| s.serial.cmp(key))
                .ok()
                .and_then(|i| v.get(i))
                .map(|s| s.meta)),
            Self::Disk(d) => d.get(key),
        }
    }

    /// Calls `f` with every slot, in order.
    fn for_each(
        &self,
        mut f: impl FnMut(Slot) -> Result<(), TableError>,
    ) -> Result<(), TableError> {
        match self {
            Self::Memory(v) => v.iter().try_for_each(|s| f(*s)),
            Self::Disk(d) => d.for_each(f),
        }
    }

    /// The table in memory (read back from disk if it is there).
    fn load(&self) -> Result<Vec<Slot>, TableError> {
        let mut v = Vec::with_capacity(self.len());
        self.for_each(|s| {
            v.push(s);
            Ok(())
        })?;
        Ok(v)
    }
}

// === impl DiskTable ===

impl DiskTable {
    /// One `pread` of the block that would hold `key`, into the stack: no allocation.
    fn get(&self, key: &[u8; 16]) -> Result<Option<Meta>, TableError> {
        let Some(block) = self.firsts.partition_point(|f| f <= key).checked_sub(1) else {
            return Ok(None);
        };
        let n = self
            .len
            .saturating_sub(block * BLOCK_SLOTS)
            .min(BLOCK_SLOTS);
        let mut buf = [0u8; BLOCK_SLOTS * SLOT_BYTES];
        let buf = &mut buf[..n * SLOT_BYTES];
        self.file
            .read_exact_at(buf, (block * BLOCK_BYTES) as u64)
            .map_err(TableError::Read)?;
        let slot = |i: usize| <&[u8; SLOT_BYTES]>::try_from(&buf[i * SLOT_BYTES..][..SLOT_BYTES]);
        let (mut lo, mut hi) = (0, n);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let Ok(s) = slot(mid) else { break };
            match s[..16].cmp(&key[..]) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Ok(Some(Slot::decode(s).meta)),
            }
        }
        Ok(None)
    }

    /// Streams every slot to `f`, in order, [`STREAM_BLOCKS`] blocks per read.
    fn for_each(
        &self,
        mut f: impl FnMut(Slot) -> Result<(), TableError>,
    ) -> Result<(), TableError> {
        let mut buf = vec![0u8; STREAM_BLOCKS * BLOCK_BYTES];
        let mut done = 0;
        while done < self.len {
            let left = self.len - done;
            let blocks = left.div_ceil(BLOCK_SLOTS).min(STREAM_BLOCKS);
            // The last block of the file stops at its last slot.
            let in_last = (left - (blocks - 1) * BLOCK_SLOTS).min(BLOCK_SLOTS);
            let bytes = (blocks - 1) * BLOCK_BYTES + in_last * SLOT_BYTES;
            let chunk = &mut buf[..bytes];
            self.file
                .read_exact_at(chunk, (done / BLOCK_SLOTS * BLOCK_BYTES) as u64)
                .map_err(TableError::Read)?;
            for block in chunk.chunks(BLOCK_BYTES) {
                let n = (self.len - done).min(BLOCK_SLOTS);
                for raw in block[..n * SLOT_BYTES].chunks_exact(SLOT_BYTES) {
                    if let Ok(raw) = <&[u8; SLOT_BYTES]>::try_from(raw) {
                        f(Slot::decode(raw))?;
                    }
                }
                done += n;
            }
        }
        Ok(())
    }
}

// === impl Sink ===

impl Sink {
    fn push(&mut self, slot: Slot) -> Result<(), TableError> {
        match self {
            Self::Memory(v) => {
                v.push(slot);
                Ok(())
            }
            Self::Disk(w) => w.push(slot).map_err(TableError::Write),
        }
    }

    /// The table written; one on disk that came out smaller than half of `spill_at` is read
    /// back into memory (half, so a table near the threshold does not go to and fro).
    fn finish(self, spill_at: usize) -> Result<Table, TableError> {
        match self {
            Self::Memory(mut v) => {
                v.shrink_to_fit();
                Ok(Table::Memory(v))
            }
            Self::Disk(w) => {
                let table = Table::Disk(w.finish()?);
                if table.len() < spill_at / 2 {
                    return Ok(Table::Memory(table.load()?));
                }
                Ok(table)
            }
        }
    }
}

// === impl DiskWriter ===

impl DiskWriter {
    fn create(dir: &Path) -> Result<Self, TableError> {
        let file = tempfile::tempfile_in(dir).map_err(|source| TableError::Create {
            dir: dir.to_owned(),
            source,
        })?;
        Ok(Self {
            out: BufWriter::with_capacity(16 * BLOCK_BYTES, file),
            len: 0,
            firsts: Vec::new(),
        })
    }

    fn push(&mut self, slot: Slot) -> std::io::Result<()> {
        if self.len % BLOCK_SLOTS == 0 {
            if self.len > 0 {
                self.out
                    .write_all(&[0u8; BLOCK_BYTES - BLOCK_SLOTS * SLOT_BYTES])?;
            }
            self.firsts.push(slot.serial);
        }
        self.out.write_all(&slot.encode())?;
        self.len += 1;
        Ok(())
    }

    /// Flushed to the page cache, not synced: the file has no name and dies with the process
    /// (and one dropped before the kernel's writeback never reaches the disk at all).
    fn finish(mut self) -> Result<DiskTable, TableError> {
        self.out.flush().map_err(TableError::Write)?;
        let file = self
            .out
            .into_inner()
            .map_err(|e| TableError::Write(e.into_error()))?;
        self.firsts.shrink_to_fit();
        Ok(DiskTable {
            file,
            len: self.len,
            firsts: self.firsts,
        })
    }
}

/// Streams `table` merged with `add` (sorted, no repeats; an entry of `add` replaces the
/// table's entry for the same serial) through `keep` (which may edit a slot and says whether it
/// stays) into `sink`. The old table is only read: on an error it is still whole.
fn rewrite(
    table: &Table,
    add: &[Slot],
    mut keep: impl FnMut(&mut Slot) -> bool,
    mut sink: Sink,
    spill_at: usize,
) -> Result<Table, TableError> {
    let mut push = |sink: &mut Sink, mut slot: Slot| {
        if keep(&mut slot) {
            sink.push(slot)
        } else {
            Ok(())
        }
    };
    let mut j = 0;
    table.for_each(|old| {
        while let Some(new) = add.get(j).filter(|n| n.serial <= old.serial) {
            j += 1;
            push(&mut sink, *new)?;
            if new.serial == old.serial {
                return Ok(());
            }
        }
        push(&mut sink, old)
    })?;
    for new in add.get(j..).unwrap_or_default() {
        push(&mut sink, *new)?;
    }
    sink.finish(spill_at)
}

/// Merges sorted `add` into sorted `sorted` in place: the table grows by exactly what is added
/// (`reserve_exact`: a large block is grown by the allocator without a copy), then the two
/// sorted runs are merged from the back; a serial in both keeps its entry from `add`.
fn merge_in_place(sorted: &mut Vec<Slot>, add: &[Slot]) {
    let old = sorted.len();
    sorted.reserve_exact(add.len());
    let filler = add.first().copied();
    if let Some(f) = filler {
        sorted.resize(old + add.len(), f);
    }
    // k - (i + j) only grows (by one per serial in both), so a write at k never lands on
    // an unread slot of `sorted`.
    let (mut i, mut j, mut k) = (old, add.len(), sorted.len());
    while j > 0 {
        k -= 1;
        let (mine, new) = (sorted.get(i.wrapping_sub(1)), &add[j - 1]);
        match mine.map(|m| m.serial.cmp(&new.serial)) {
            Some(std::cmp::Ordering::Greater) => {
                sorted[k] = sorted[i - 1];
                i -= 1;
            }
            Some(std::cmp::Ordering::Equal) => {
                sorted[k] = *new;
                i -= 1;
                j -= 1;
            }
            _ => {
                sorted[k] = *new;
                j -= 1;
            }
        }
    }
    // Serials in both left a gap of as many slots at the front.
    let gap = k - i;
    if gap > 0 {
        sorted.copy_within(0..i, gap);
        sorted.drain(..gap);
    }
}

/// Gives the tags still in use new, dense numbers, in the order they are met.
struct Renumber<'a> {
    old: &'a [Tag],
    map: Vec<u32>,
    tags: Vec<Tag>,
}

impl<'a> Renumber<'a> {
    fn new(old: &'a [Tag]) -> Self {
        Self {
            old,
            map: vec![u32::MAX; old.len()],
            tags: Vec::new(),
        }
    }

    fn visit(&mut self, m: &mut Meta) {
        let old = m.tag as usize;
        if let Some(new) = self.map.get_mut(old) {
            if *new == u32::MAX {
                *new = u32::try_from(self.tags.len()).unwrap_or(u32::MAX);
                if let Some(t) = self.old.get(old) {
                    self.tags.push(t.clone());
                }
            }
            m.tag = *new;
        }
    }
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
        self.table.len() + self.recent.len() + self.other.len()
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
        // Not looked up in the table first (a binary search of a 24 MB table is ~20 cache
        // misses, and a read on disk): a serial already there is replaced when `recent` is
        // merged, and `recent` is asked first until then.
        self.recent.insert(key, meta);
        let most = match self.table {
            Table::Memory(_) => MERGE_MAX,
            Table::Disk(_) => MERGE_MAX_DISK,
        };
        if self.recent.len() >= (self.table.len() / 8).clamp(MERGE_MIN, most) {
            self.merge();
        }
    }

    /// Whether a table of `slots` goes to disk: from the threshold up, and a table already
    /// there stays until it is under half of it (so one near the threshold does not go to and
    /// fro), unless writing failed since and the table has not doubled.
    fn spills(&self, slots: usize) -> bool {
        let on_disk = matches!(self.table, Table::Disk(_));
        self.spill.as_ref().is_some_and(|s| {
            let at = if on_disk { s.at / 2 } else { s.at };
            slots >= at.max(s.retry_at)
        })
    }

    /// A sink for a new table of about `slots`: a new file when it goes to disk.
    fn sink(&self, slots: usize) -> Result<Sink, TableError> {
        match &self.spill {
            Some(s) if self.spills(slots) => Ok(Sink::Disk(DiskWriter::create(&s.dir)?)),
            _ => Ok(Sink::Memory(Vec::with_capacity(slots))),
        }
    }

    /// The threshold in slots (for [`Sink::finish`]).
    fn spill_at(&self) -> usize {
        self.spill.as_ref().map_or(SPILL_AT, |s| s.at)
    }

    /// Logs a failure to keep the table on disk (a warning when it is new, debug while it
    /// repeats) and waits for the table to double before trying again.
    fn spill_failed(&mut self, error: &TableError, slots: usize) {
        let Some(s) = &mut self.spill else { return };
        let msg = error.to_string();
        if s.last_error.as_deref() == Some(msg.as_str()) {
            debug!(%error, slots, "revocation table kept in memory");
        } else {
            warn!(%error, slots, dir = %s.dir.display(), "cannot keep the revocation table on disk; keeping it in memory");
        }
        s.last_error = Some(msg);
        s.retry_at = slots.saturating_mul(2);
    }

    /// Notes that the table is where it was meant to go.
    fn spill_worked(&mut self, before: bool) {
        let (on_disk, slots) = (matches!(self.table, Table::Disk(_)), self.table.len());
        if let Some(s) = &mut self.spill {
            if s.last_error.take().is_some() {
                info!(slots, dir = %s.dir.display(), "revocation table on disk again");
            } else if on_disk != before {
                debug!(slots, on_disk, "revocation table moved");
            }
            s.retry_at = 0;
        }
    }

    /// Moves `recent` into the table. In memory, in place ([`merge_in_place`]); on disk (or
    /// going there), by writing a new file from the old table and `recent`, then swapping: the
    /// old table serves until the new one is whole, and stays if writing fails (the table is
    /// then read back into memory: revocations are never dropped to save memory).
    fn merge(&mut self) {
        if self.recent.is_empty() {
            return;
        }
        let mut add: Vec<Slot> = self
            .recent
            .drain()
            .map(|(serial, meta)| Slot { serial, meta })
            .collect();
        // A drained map keeps its capacity (~3 MiB after a catch-up's 64 Ki entries).
        self.recent.shrink_to(MERGE_MIN);
        add.sort_unstable_by_key(|a| a.serial);
        let slots = self.table.len() + add.len();
        let on_disk = matches!(self.table, Table::Disk(_));
        if !self.spills(slots)
            && let Table::Memory(sorted) = &mut self.table
        {
            merge_in_place(sorted, &add);
            return;
        }
        let spill_at = self.spill_at();
        let written = self
            .sink(slots)
            .and_then(|sink| rewrite(&self.table, &add, |_| true, sink, spill_at));
        match written {
            Ok(table) => {
                self.table = table;
                self.spill_worked(on_disk);
            }
            Err(e) => {
                self.spill_failed(&e, slots);
                match self.table.load() {
                    Ok(mut sorted) => {
                        merge_in_place(&mut sorted, &add);
                        self.table = Table::Memory(sorted);
                    }
                    Err(e) => {
                        // Still exact: `recent` is asked before the table.
                        error!(error = %e, "revocation table unreadable; keeping new entries aside");
                        self.recent
                            .extend(add.into_iter().map(|s| (s.serial, s.meta)));
                    }
                }
            }
        }
    }

    /// The entry of `serial`, if any; an error when the table on disk cannot be read.
    fn get(&self, serial: &[u8]) -> Result<Option<Meta>, TableError> {
        let Some(key) = short(serial) else {
            return Ok(self.other.get(serial).copied());
        };
        if let Some(m) = self.recent.get(&key) {
            return Ok(Some(*m));
        }
        self.table.get(&key)
    }

    /// Drops entries that expired before `now`, and the tags no entry uses any more. A table on
    /// disk is rewritten (and comes back into memory if it shrinks below half the threshold);
    /// if that fails it is swept in memory, and if it cannot be read nothing is swept.
    fn sweep(&mut self, now: i64) {
        // Merged first: a recent entry that replaced one in the table with an earlier expiry
        // would otherwise be swept alone and leave the replaced entry answering again.
        self.merge();
        let now = clamp_time(now);
        let old_tags = std::mem::take(&mut self.tags);
        let mut renumber = Renumber::new(&old_tags);
        let on_disk = matches!(self.table, Table::Disk(_));
        if let Table::Memory(sorted) = &mut self.table {
            sorted.retain(|s| s.meta.expires >= now);
            sorted.shrink_to_fit();
            sorted.iter_mut().for_each(|s| renumber.visit(&mut s.meta));
        } else {
            let (spill_at, slots) = (self.spill_at(), self.table.len());
            let keep = |s: &mut Slot| {
                let live = s.meta.expires >= now;
                if live {
                    renumber.visit(&mut s.meta);
                }
                live
            };
            let written = match &self.spill {
                Some(s) => DiskWriter::create(&s.dir).map(Sink::Disk),
                None => Ok(Sink::Memory(Vec::new())),
            }
            .and_then(|sink| rewrite(&self.table, &[], keep, sink, spill_at));
            match written {
                Ok(table) => {
                    self.table = table;
                    self.spill_worked(on_disk);
                }
                Err(e) => {
                    // Part of the renumbering went with the new table: start over in memory.
                    self.tags = old_tags;
                    self.spill_failed(&e, slots);
                    match self.table.load() {
                        Ok(sorted) => {
                            self.table = Table::Memory(sorted);
                            self.sweep(i64::from(now));
                        }
                        Err(e) => error!(error = %e, "revocation table unreadable; not swept"),
                    }
                    return;
                }
            }
        }
        self.recent.retain(|_, m| m.expires >= now);
        self.other.retain(|_, m| m.expires >= now);
        self.recent.values_mut().for_each(|m| renumber.visit(m));
        self.other.values_mut().for_each(|m| renumber.visit(m));
        let tags = renumber.tags;
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
        // A merge makes one entry per serial. A table on disk is not rewritten for a few recent
        // inserts (the follower asks after every burst of news: a 24 MB file written per new
        // revocation, which the kernel writes back to the disk), but after a catch-up the
        // recent map goes into it, so it does not stay that large while the agent idles.
        if !matches!(g.serials.table, Table::Disk(_)) || g.serials.recent.len() >= MERGE_MIN {
            g.serials.merge();
        }
        let s = &g.serials;
        let now = clamp_time(now);
        let counted =
            |m: &Meta| m.expires >= now && s.tag(*m).is_some_and(|t| t.relayed_for.is_none());
        let mut count = 0usize;
        let mut digest = 0u64;
        let mut raw = [0u8; LANYARD_SERIAL_LEN];
        raw[0] = 0x01;
        let mut add = |serial: &[u8; 16]| {
            raw[1..].copy_from_slice(serial);
            count += 1;
            digest = digest.wrapping_add(serial_hash(&raw));
        };
        // A serial in both counts once, with its recent entry (what `get` answers).
        let walked = s.table.for_each(|slot| {
            if counted(&slot.meta) && !s.recent.contains_key(&slot.serial) {
                add(&slot.serial);
            }
            Ok(())
        });
        if let Err(error) = walked {
            // A digest no CRL has: the CRL follower fetches rather than trust this one.
            warn!(%error, "cannot take the revocation set's digest");
            return (usize::MAX, 0);
        }
        for (serial, _) in s.recent.iter().filter(|(_, m)| counted(m)) {
            add(serial);
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

    /// An empty set that keeps its table of serials in an unlinked file in `dir` once it holds
    /// 64 Ki of them (1.5 MB), with only a sparse index in memory: a lookup is then one read of
    /// a 4 KiB page. `dir` should be on a disk: a file on tmpfs is memory too. If a file cannot
    /// be written there the set keeps working in memory, as [`RevocationSet::new`]'s does.
    pub fn spilling_to(dir: impl Into<PathBuf>) -> Arc<Self> {
        Self::spilling_at(dir.into(), SPILL_AT)
    }

    /// [`RevocationSet::spilling_to`] with the threshold at `at` slots.
    fn spilling_at(dir: PathBuf, at: usize) -> Arc<Self> {
        let set = Self::default();
        set.inner
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .serials
            .spill = Some(Spill {
            dir,
            at: at.max(1),
            retry_at: 0,
            last_error: None,
        });
        Arc::new(set)
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
        let found = match g.serials.get(svid.serial.as_bytes()) {
            Ok(found) => found,
            Err(error) => {
                // The table on disk cannot be read (a failing disk): no exact answer, so the
                // safe one. Whoever asks refuses this certificate, as for a revoked one.
                error!(%error, serial = %svid.serial, "cannot check a certificate for revocation");
                return Some(format!(
                    "certificate {} cannot be checked for revocation: {error}",
                    svid.serial
                ));
            }
        };
        if let Some(tag) = found.and_then(|m| g.serials.tag(m))
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
    use std::collections::BTreeMap;

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
            assert!(g.serials.get(&serial).unwrap().is_some(), "live {i} kept");
        }
    }

    /// The Lanyard-shaped serial whose random octets are all zero but the last, `b`: keys that
    /// sort as `b` does.
    fn key(b: u8) -> [u8; 17] {
        let mut k = [0u8; 17];
        k[0] = 1;
        k[16] = b;
        k
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
            g.serials.table.len() > model.len() / 2,
            "merged into the table"
        );
        // Replaced serials sit in both parts until a merge keeps the recent entry.
        g.serials.merge();
        assert_eq!(g.serials.len(), model.len());
        assert!(
            g.serials
                .table
                .load()
                .unwrap()
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
            .table
            .load()
            .unwrap()
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
        let m = s.get(&key(20)).unwrap().unwrap();
        assert_eq!((&*s.tag(m).unwrap().reason, m.expires), ("newer", 3_000));
        assert_eq!(
            &*s.tag(s.get(&key(30)).unwrap().unwrap()).unwrap().reason,
            "old"
        );
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
        assert!(!s.recent.is_empty() && s.table.len() > 0);
        s.sweep(1_500);
        assert_eq!(s.len(), 3001);
        assert_eq!(s.tags.len(), 4);
        assert_eq!(s.tag_ids.len(), 4);
        for (i, serial) in live.iter().enumerate() {
            let m = s.get(serial.as_bytes()).unwrap().unwrap();
            assert_eq!(&*s.tag(m).unwrap().reason, format!("live {}", i % 3));
        }
        assert_eq!(
            &*s.tag(s.get(&[0x43]).unwrap().unwrap()).unwrap().reason,
            "live other"
        );
        assert!(s.get(&[0x42]).unwrap().is_none());
        // Interning goes on after the renumbering.
        s.insert(&[0x44], 2_000, "live 1", None);
        assert_eq!(s.tags.len(), 4);
    }

    /// Serials with a table on disk from `at` slots, in a new directory (kept alive by the
    /// returned guard).
    fn spilling(at: usize) -> (tempfile::TempDir, Serials) {
        let dir = tempfile::tempdir().unwrap();
        let s = Serials {
            spill: Some(Spill {
                dir: dir.path().to_owned(),
                at,
                retry_at: 0,
                last_error: None,
            }),
            ..Serials::default()
        };
        (dir, s)
    }

    fn on_disk(s: &Serials) -> bool {
        matches!(s.table, Table::Disk(_))
    }

    /// Every entry of `model` is found with its expiry and reason, and serials not in it are
    /// not found.
    fn agrees(s: &Serials, model: &BTreeMap<Vec<u8>, (u32, String)>, absent: &[Vec<u8>]) {
        for (serial, (expires, reason)) in model {
            let m = s.get(serial).unwrap().expect("a live entry is found");
            assert_eq!(
                (m.expires, &*s.tag(m).unwrap().reason),
                (*expires, &**reason)
            );
        }
        for serial in absent {
            assert!(s.get(serial).unwrap().is_none());
        }
        assert_eq!(
            s.len()
                - s.recent
                    .keys()
                    .filter(|k| s.table.get(k).unwrap().is_some())
                    .count(),
            model.len()
        );
    }

    /// A table on disk answers exactly as a plain map of every entry does, across merges,
    /// replaced entries and sweeps, while it grows past the threshold, shrinks back under half
    /// of it (into memory) and grows again; and its files have no name in the directory.
    #[test]
    fn a_table_on_disk_answers_like_a_plain_map_across_merges_and_sweeps() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(118);
        let (dir, mut s) = spilling(2_000);
        let mut model: BTreeMap<Vec<u8>, (u32, String)> = BTreeMap::new();
        let mut swept: Vec<Vec<u8>> = Vec::new();
        let (mut went_to_disk, mut came_back) = (false, false);
        let mut now = 1_000i64;
        for round in 0..3 {
            // Grow to ~5x the threshold, expiries spread over the next 1,000 seconds.
            for i in 0..10_000u32 {
                let replace = i % 9 == 4 && !model.is_empty();
                let serial = if replace {
                    let k = rng.random_range(0..model.len());
                    model.keys().nth(k).unwrap().clone()
                } else if i % 997 == 1 {
                    (u64::from(i) + 1_000_000 * round).to_be_bytes().to_vec() // another shape
                } else {
                    lanyard_serial(&mut rng).as_bytes().to_vec()
                };
                let expires = now + rng.random_range(1..1_000);
                let reason = format!("reason {}", rng.random_range(0..20));
                s.insert(&serial, expires, &reason, None);
                model.insert(serial, (clamp_time(expires), reason));
                went_to_disk |= on_disk(&s);
                if i % 2_500 == 0 {
                    agrees(&s, &model, &swept);
                }
            }
            assert!(
                on_disk(&s),
                "round {round}: {} slots on disk",
                s.table.len()
            );
            agrees(&s, &model, &swept);
            s.merge();
            agrees(&s, &model, &swept);
            // Sweep in steps until ~2 % are left: under half the threshold, back in memory.
            for step in 1..=5 {
                now += 196;
                let before = clamp_time(now);
                s.sweep(now);
                let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut model)
                    .into_iter()
                    .partition(|(_, (e, _))| *e < before);
                swept.extend(gone.into_iter().map(|(k, _)| k));
                model = kept.into_iter().collect();
                agrees(&s, &model, &swept);
                assert!(s.tags.len() <= 20, "step {step}: tags renumbered");
            }
            assert!(
                !on_disk(&s),
                "round {round}: {} slots left in memory",
                s.table.len()
            );
            came_back = true;
            swept.retain(|k| !model.contains_key(k));
        }
        assert!(went_to_disk && came_back);
        let slots = s.table.load().unwrap();
        assert!(slots.windows(2).all(|w| w[0].serial < w[1].serial));
        // Unlinked: nothing to clean up after a crash, nothing for a watcher of the directory.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    /// At the real threshold (64 Ki slots) the agent's set goes to disk through `apply`, and
    /// `check` and the digest answer as before, for entries in the table and in the recent map.
    #[test]
    fn a_set_spilling_to_a_directory_answers_as_one_in_memory() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        let dir = tempfile::tempdir().unwrap();
        let (disk, memory) = (RevocationSet::spilling_to(dir.path()), RevocationSet::new());
        let serials: Vec<Serial> = (0..SPILL_AT + 5_000)
            .map(|_| lanyard_serial(&mut rng))
            .collect();
        for (i, serial) in serials.iter().enumerate() {
            let e = RevocationEntry {
                serial: serial.to_hex(),
                expires_at: i64::MAX,
                reason: format!("reason {}", i % 5),
                rev: i as u64 + 1,
                ..Default::default()
            };
            disk.apply(&e);
            memory.apply(&e);
        }
        assert!(on_disk(&disk.inner.read().unwrap().serials));
        assert!(!on_disk(&memory.inner.read().unwrap().serials));
        let id = "spiffe://example.org/x";
        for serial in serials.iter().step_by(7) {
            let want = memory.check(&cert(serial, id));
            assert!(want.is_some());
            assert_eq!(disk.check(&cert(serial, id)), want);
        }
        for _ in 0..2_000 {
            assert!(disk.check(&cert(&lanyard_serial(&mut rng), id)).is_none());
        }
        assert_eq!(disk.serial_digest(0), memory.serial_digest(0));
        assert_eq!(disk.serial_digest(0).0, serials.len());
        // A few news after that (one replacing an entry with an expired one) are counted
        // without rewriting the table on disk.
        for (i, serial) in [serials[3].clone(), lanyard_serial(&mut rng)]
            .iter()
            .enumerate()
        {
            let e = RevocationEntry {
                serial: serial.to_hex(),
                expires_at: if i == 0 { 1 } else { i64::MAX },
                reason: "news".into(),
                rev: (serials.len() + i + 1) as u64,
                ..Default::default()
            };
            disk.apply(&e);
            memory.apply(&e);
        }
        assert_eq!(disk.serial_digest(10), memory.serial_digest(10));
        assert_eq!(disk.serial_digest(10).0, serials.len());
        assert_eq!(disk.inner.read().unwrap().serials.recent.len(), 2);
    }

    /// When the directory goes away (or is not one), the set keeps its table in memory without
    /// losing an entry, and goes back to disk once it can, after the table has doubled.
    #[test]
    fn a_table_that_cannot_be_written_stays_in_memory_whole() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let (dir, mut s) = spilling(1_000);
        let mut model = BTreeMap::new();
        type Model = BTreeMap<Vec<u8>, (u32, String)>;
        fn add(s: &mut Serials, model: &mut Model, rng: &mut impl rand::Rng, n: usize) {
            for _ in 0..n {
                let serial = lanyard_serial(rng).as_bytes().to_vec();
                s.insert(&serial, 5_000, "r", None);
                model.insert(serial, (5_000, "r".into()));
            }
            s.merge();
            agrees(s, model, &[]);
        }
        add(&mut s, &mut model, &mut rng, 3_000);
        assert!(on_disk(&s));
        // The open file outlives its directory; a new one cannot be made there.
        std::fs::remove_dir(dir.path()).unwrap();
        add(&mut s, &mut model, &mut rng, 500);
        assert!(!on_disk(&s), "fell back to memory");
        assert!(s.spill.as_ref().unwrap().last_error.is_some());
        // A sweep of a table in memory does not need the directory.
        s.sweep(1_000);
        agrees(&s, &model, &[]);
        std::fs::create_dir(dir.path()).unwrap();
        add(&mut s, &mut model, &mut rng, 1_000);
        assert!(!on_disk(&s), "not retried before the table doubles");
        add(&mut s, &mut model, &mut rng, 3_000);
        assert!(on_disk(&s), "back on disk");
        assert!(s.spill.as_ref().unwrap().last_error.is_none());
        // A table on disk whose sweep cannot write a new file is swept in memory.
        std::fs::remove_dir(dir.path()).unwrap();
        s.sweep(6_000);
        assert!(!on_disk(&s));
        model.clear();
        agrees(&s, &model, &[]);
        assert_eq!(s.len(), 0);
        // A path that is not a directory at all.
        let file = tempfile::NamedTempFile::new().unwrap();
        let (_dir, mut s) = spilling(1_000);
        s.spill.as_mut().unwrap().dir = file.path().to_owned();
        add(&mut s, &mut model, &mut rng, 2_000);
        assert!(!on_disk(&s));
    }

    /// A serial revoked again with an earlier expiry is gone once that expiry passes, even
    /// while the entry it replaced is still in the table (in memory and on disk).
    #[test]
    fn a_sweep_drops_a_replaced_entry_with_its_replacement() {
        let (_dir, disk) = spilling(2);
        for mut s in [Serials::default(), disk] {
            for b in 0..4 {
                s.insert(&key(b), 5_000, "first", None);
            }
            s.merge();
            s.insert(&key(1), 1_000, "again", None);
            s.sweep(2_000);
            assert!(s.get(&key(1)).unwrap().is_none());
            assert_eq!(s.len(), 3);
        }
    }
}
