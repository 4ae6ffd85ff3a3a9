//! The sled backend's own write-ahead log: what makes a journaled group of issuances durable
//! without a flush of sled's log (decision 111).
//!
//! sled writes its log only through its IO pool, and every hand-off to that pool wakes all seven
//! of its threads (decision 80): most of what a lone renewal costs the CA beyond its crypto. So a
//! group that [`super::sled`] writes without a transaction (audit records, enrollments, issued
//! certificates) is also appended here, as one record, and made durable by one `fdatasync` of
//! this file; sled's own log is written out lazily, by its flusher or at a checkpoint.
//!
//! Each record names the audit seqs its group carries. At open, the groups whose seqs come
//! after the last audit record sled kept are applied again, in seq order, from the one that
//! follows it; groups sled already holds are skipped, so a record older than what sled
//! persisted never writes an old value over a newer one. The chain stops at the first missing
//! seq: a later group there was never acknowledged (see [`Wal::sync`]'s caller).
//!
//! Two files take turns: a checkpoint (a flush of sled's log) starts appending to the other one
//! and, once sled's log is durable, retires the first, whose groups sled now holds: its next
//! turn writes over it from the start. A file is grown with zeros a mebibyte at a time ahead of
//! the records and never shrunk while the store is open, so the `fdatasync` after an append
//! writes data into blocks the file already has and, most of the time, no file-system metadata
//! (an append past the end would change the file's size and make every sync a journal commit).
//! What is left of an earlier turn past the new records is older than what sled holds, and a
//! replay skips it by seq.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;

use super::StoreError;

/// The two log files, in the store's directory beside sled's own.
const FILES: [&str; 2] = ["lanyard-wal.0", "lanyard-wal.1"];

/// Record header: payload length (4 bytes), CRC-32 of the rest of the record (4), first and
/// last audit seq of the group (8 each), all little-endian.
const HEADER: usize = 24;

/// A checkpoint is due once the file being appended to holds this much: it bounds the log's
/// size and the work of a replay.
pub(super) const CHECKPOINT_BYTES: u64 = 8 << 20;

/// How far ahead of the records a file is grown with zeros.
const GROW_BYTES: u64 = 1 << 20;

/// The append-only group log of a sled store.
pub(super) struct Wal {
    files: [File; 2],
    state: Mutex<State>,
}

/// What has been appended to, and synced of, each file.
struct State {
    /// The file appended to.
    active: usize,
    /// Bytes of records per file in its current turn (where the next append goes).
    len: [u64; 2],
    /// Each file's size: records, then zeros or an earlier turn's records.
    size: [u64; 2],
    /// Bytes of each file known to be on stable storage.
    synced: [u64; 2],
    /// Bumped when a file is emptied, so a sync that began before does not count for after.
    generation: [u64; 2],
    /// An append failed part-way: the file may end in a torn record, so nothing more is appended
    /// (the store makes later groups durable through sled's log instead) until a restart.
    broken: bool,
}

/// A checkpoint in progress: the file that was active when it began.
pub(super) struct Rotation {
    file: usize,
    generation: u64,
}

/// One group as read back at open.
struct Record {
    first: u64,
    last: u64,
    payload: Vec<u8>,
}

fn io_err(what: &str, e: std::io::Error) -> StoreError {
    StoreError::Backend(format!("write-ahead log: {what}: {e}"))
}

impl Wal {
    /// Opens (creating if needed) the log files in `dir`; both must be empty (see [`replay`]).
    pub(super) fn open(dir: &Path) -> Result<Self, StoreError> {
        let open = |name: &str| {
            OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(false)
                .read(true)
                .open(dir.join(name))
                .map_err(|e| io_err(&format!("opening {name}"), e))
        };
        let files = [open(FILES[0])?, open(FILES[1])?];
        // The files' directory entries must survive a power cut before anything counts on them.
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_err("syncing the store directory", e))?;
        let size = [
            files[0].metadata().map_err(|e| io_err("stat", e))?.len(),
            files[1].metadata().map_err(|e| io_err("stat", e))?.len(),
        ];
        Ok(Self {
            files,
            state: Mutex::new(State {
                active: 0,
                len: size,
                size,
                synced: size,
                generation: [0; 2],
                broken: false,
            }),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends one group whose audit records are `first..=last`. Not durable until
    /// [`Wal::sync`]. `Ok(false)` when the log no longer takes appends (an earlier one failed):
    /// the caller must make the group durable another way.
    pub(super) fn append(&self, first: u64, last: u64, payload: &[u8]) -> Result<bool, StoreError> {
        let mut state = self.state();
        if state.broken {
            return Ok(false);
        }
        let Ok(len) = u32::try_from(payload.len()) else {
            return Ok(false);
        };
        let mut record = Vec::with_capacity(HEADER + payload.len());
        record.extend_from_slice(&len.to_le_bytes());
        record.extend_from_slice(&[0; 4]);
        record.extend_from_slice(&first.to_le_bytes());
        record.extend_from_slice(&last.to_le_bytes());
        record.extend_from_slice(payload);
        let crc = crc32fast::hash(&record[8..]);
        record[4..8].copy_from_slice(&crc.to_le_bytes());
        let active = state.active;
        let (at, file) = (state.len[active], &self.files[active]);
        let end = at + record.len() as u64;
        let grown = if end > state.size[active] {
            let size = end.next_multiple_of(GROW_BYTES);
            grow(file, state.size[active], size).map(|()| size)
        } else {
            Ok(state.size[active])
        };
        match grown.and_then(|size| file.write_all_at(&record, at).map(|()| size)) {
            Ok(size) => {
                state.size[active] = size;
                state.len[active] = end;
                Ok(true)
            }
            Err(e) => {
                state.broken = true;
                Err(io_err("append", e))
            }
        }
    }

    /// Whether the active file has grown past [`CHECKPOINT_BYTES`].
    pub(super) fn checkpoint_due(&self) -> bool {
        let state = self.state();
        state.len[state.active] >= CHECKPOINT_BYTES
    }

    /// Makes every append made before this call durable (one `fdatasync` per file that has
    /// unsynced appends; none when there are none).
    pub(super) fn sync(&self) -> Result<(), StoreError> {
        for file in 0..2 {
            let (target, generation) = {
                let state = self.state();
                if state.synced[file] >= state.len[file] {
                    continue;
                }
                (state.len[file], state.generation[file])
            };
            self.files[file]
                .sync_data()
                .map_err(|e| io_err("fdatasync", e))?;
            let mut state = self.state();
            if state.generation[file] == generation {
                state.synced[file] = state.synced[file].max(target);
            }
        }
        Ok(())
    }

    /// Starts a checkpoint: later appends go to the other file. Every group already in the
    /// active file was applied to sled before it was appended, so once sled's log is durable
    /// [`Wal::retire`] may empty it. `None` when the active file is empty (nothing to retire).
    /// Checkpoints must not overlap (the caller serializes them).
    pub(super) fn rotate(&self) -> Option<Rotation> {
        let mut state = self.state();
        let file = state.active;
        if state.len[file] == 0 || state.len[1 - file] != 0 {
            return None;
        }
        state.active = 1 - file;
        Some(Rotation {
            file,
            generation: state.generation[file],
        })
    }

    /// Ends a checkpoint once sled's log is durable: the file it rotated away from takes its
    /// next turn from the start. Its records stay until written over; sled holds them all, so a
    /// replay skips them by seq.
    pub(super) fn retire(&self, r: Rotation) {
        let mut state = self.state();
        if state.generation[r.file] != r.generation || state.active == r.file {
            return;
        }
        state.len[r.file] = 0;
        state.synced[r.file] = 0;
        state.generation[r.file] += 1;
    }
}

/// Writes zeros to `file` from `from` up to `to`, from a static buffer: a heap buffer of a
/// mebibyte would raise glibc's mmap threshold and stay in the CA's memory once freed.
fn grow(file: &File, from: u64, to: u64) -> std::io::Result<()> {
    static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
    let mut at = from;
    while at < to {
        let n = (to - at).min(ZEROS.len() as u64);
        file.write_all_at(&ZEROS[..n as usize], at)?;
        at += n;
    }
    Ok(())
}

/// Reads the log files in `dir` and applies, in seq order, each group that follows `head` (the
/// seq of the last audit record sled holds; 0 for none) through `apply`. Returns how many groups
/// were applied and how many valid records past a gap were dropped; the files are left as they
/// are (the caller empties them once what was applied is durable, see [`clear`]).
pub(super) fn replay(
    dir: &Path,
    mut head: u64,
    mut apply: impl FnMut(&[u8]) -> Result<(), StoreError>,
) -> Result<(usize, usize), StoreError> {
    let mut records = Vec::new();
    for name in FILES {
        let mut raw = Vec::new();
        match File::open(dir.join(name)) {
            Ok(mut f) => f
                .read_to_end(&mut raw)
                .map_err(|e| io_err(&format!("reading {name}"), e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(&format!("opening {name}"), e)),
        };
        parse(&raw, &mut records);
    }
    records.sort_by_key(|r| r.first);
    let (mut applied, mut dropped) = (0, 0);
    for r in &records {
        if r.last <= head {
            continue;
        }
        if r.first != head + 1 {
            // A seq is missing (its group went through sled's log and was lost with it), so
            // nothing after it was acknowledged.
            dropped += 1;
            continue;
        }
        apply(&r.payload)?;
        head = r.last;
        applied += 1;
    }
    Ok((applied, dropped))
}

/// Empties the log files in `dir` durably (after a replay's writes are durable in sled).
pub(super) fn clear(dir: &Path) -> Result<(), StoreError> {
    for name in FILES {
        match OpenOptions::new().write(true).open(dir.join(name)) {
            Ok(f) => f
                .set_len(0)
                .and_then(|()| f.sync_all())
                .map_err(|e| io_err(&format!("emptying {name}"), e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&format!("opening {name}"), e)),
        }
    }
    Ok(())
}

/// The whole records at the start of `raw`; parsing stops at the first that is torn or fails its
/// checksum (a crash mid-append, or old bytes past an emptied file's new end).
fn parse(raw: &[u8], out: &mut Vec<Record>) {
    let mut rest = raw;
    while rest.len() >= HEADER {
        let word =
            |at: usize| u32::from_le_bytes([rest[at], rest[at + 1], rest[at + 2], rest[at + 3]]);
        let seq = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&rest[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let len = word(0) as usize;
        let Some(end) = HEADER.checked_add(len).filter(|e| *e <= rest.len()) else {
            return;
        };
        if crc32fast::hash(&rest[8..end]) != word(4) {
            return;
        }
        let (first, last) = (seq(8), seq(16));
        if first == 0 || last < first {
            return;
        }
        out.push(Record {
            first,
            last,
            payload: rest[HEADER..end].to_vec(),
        });
        rest = &rest[end..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replayed(dir: &Path, head: u64) -> (Vec<Vec<u8>>, usize) {
        let mut got = Vec::new();
        let (n, dropped) = replay(dir, head, |p| {
            got.push(p.to_vec());
            Ok(())
        })
        .unwrap();
        assert_eq!(n, got.len());
        (got, dropped)
    }

    #[test]
    fn groups_after_the_head_replay_in_seq_order() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path()).unwrap();
        assert!(wal.append(1, 2, b"a").unwrap());
        assert!(wal.append(3, 3, b"b").unwrap());
        // A checkpoint in progress: the next groups go to the other file.
        let r = wal.rotate().unwrap();
        assert!(wal.append(4, 6, b"c").unwrap());
        wal.sync().unwrap();
        assert_eq!(replayed(dir.path(), 0).0, [b"a", b"b", b"c"]);
        assert_eq!(replayed(dir.path(), 2).0, [b"b", b"c"]);
        assert_eq!(replayed(dir.path(), 3).0, [b"c"]);
        assert_eq!(replayed(dir.path(), 6).0, Vec::<Vec<u8>>::new());
        // Retired: sled holds 1..=3 now.
        wal.retire(r);
        assert_eq!(replayed(dir.path(), 3).0, [b"c"]);
        // The emptied file takes appends again at the next rotation.
        assert!(wal.rotate().is_some());
        assert!(wal.append(7, 7, b"d").unwrap());
        assert_eq!(replayed(dir.path(), 3).0, [b"c", b"d"]);
        clear(dir.path()).unwrap();
        assert_eq!(replayed(dir.path(), 0).0, Vec::<Vec<u8>>::new());
    }

    #[test]
    fn a_gap_or_a_torn_record_ends_the_replay() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path()).unwrap();
        wal.append(1, 1, b"a").unwrap();
        // Seq 2 went through sled's log and was lost with it: 3 was never acknowledged.
        wal.append(3, 3, b"c").unwrap();
        assert_eq!(replayed(dir.path(), 0), (vec![b"a".to_vec()], 1));
        assert_eq!(replayed(dir.path(), 2).0, [b"c"]);

        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path()).unwrap();
        wal.append(1, 1, b"first").unwrap();
        wal.append(2, 2, b"second").unwrap();
        drop(wal);
        let path = dir.path().join(FILES[0]);
        let mut raw = std::fs::read(&path).unwrap();
        // Grown ahead with zeros.
        assert_eq!(raw.len() as u64, GROW_BYTES);
        // A crash mid-append: the second record's last bytes never reached the disk.
        let end = 2 * HEADER + "first".len() + "second".len();
        raw[end - 3..end].fill(0);
        std::fs::write(&path, &raw).unwrap();
        assert_eq!(replayed(dir.path(), 0).0, [b"first"]);
        // A flipped bit fails the checksum.
        raw[HEADER] ^= 1;
        std::fs::write(&path, &raw).unwrap();
        assert_eq!(replayed(dir.path(), 0).0, Vec::<Vec<u8>>::new());
    }

    #[test]
    fn rotation_needs_appends_and_an_empty_spare() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path()).unwrap();
        assert!(wal.rotate().is_none(), "nothing to retire");
        wal.append(1, 1, b"a").unwrap();
        let r = wal.rotate().unwrap();
        wal.append(2, 2, b"b").unwrap();
        assert!(wal.rotate().is_none(), "the spare still holds 1");
        wal.retire(r);
        assert!(!wal.checkpoint_due());
        wal.sync().unwrap();
        assert_eq!(replayed(dir.path(), 1).0, [b"b"]);
    }
}
