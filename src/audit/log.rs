//! The single writer: group commit of audit records and the state changes they describe.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{error, warn};

use super::chain::{GENESIS_HASH, compute_hash};
use super::{AuditError, Event};
use crate::store::{
    AccessRecord, AuditRecord, RECORD_VERSION, RevocationRecord, Store, StoreError, Write,
};

/// Most events committed in one transaction and one fsync.
const MAX_GROUP: usize = 1024;
/// Longest a group is held open, from its first event, for events expected soon. A sled flush
/// costs ~200 µs of CPU (an fsync plus sled's I/O threads waking up), more than everything else
/// an event costs the writer, and without waiting a loaded CA commits groups of 2-3 (measured by
/// `benches/issue.rs`). A group is held open only while it is smaller than the recent groups
/// were, or while an announced event ([`Intent`]) is still on its way; a caller alone (recent
/// groups of one, nothing announced) never waits.
const GATHER_WINDOW: Duration = Duration::from_millis(2);
/// How many recent group sizes the writer remembers to guess the next one.
const RECENT_GROUPS: usize = 16;
/// Records kept for live subscribers; one that falls further behind is fed from the store.
const LIVE_BUFFER: usize = 4096;
/// Records read from the store per page while replaying.
const REPLAY_PAGE: usize = 512;

/// Flushes (one fsync each, covering one or more committed groups) and the events they made
/// durable, over every log in this process: events / flushes is the group-commit factor.
static GROUPS: AtomicU64 = AtomicU64::new(0);
static EVENTS: AtomicU64 = AtomicU64::new(0);

/// How often a group is re-sequenced after other replicas appended first before it fails.
const MAX_HEAD_RETRIES: u32 = 64;

pub use crate::store::Committed;

struct Pending {
    event: Event,
    writes: Vec<Write>,
    done: oneshot::Sender<Result<AuditRecord, AuditError>>,
}

/// Handle to the audit log. Cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Pending>,
    live: broadcast::Sender<Arc<Committed>>,
    store: Arc<dyn Store>,
    gate: Arc<Gate>,
    /// The writer's state, locked by its thread for each group it gathers and commits, and by a
    /// caller that commits a lone event itself (see [`AuditLog::commit_if_alone`]).
    writer: Arc<Mutex<Writer>>,
    /// Whether callers may commit a lone event themselves: only on a local store (one that
    /// leaves publishing to the log), whose commit is a few sled writes and one `fdatasync`,
    /// never a network round trip.
    inline: bool,
}

/// What the writer and the callers share to size groups.
#[derive(Default)]
struct Gate {
    /// Intents taken and not yet handed to the writer.
    outstanding: AtomicUsize,
    /// The writer is parked waiting for more events of the current group.
    gathering: AtomicBool,
    writer: OnceLock<std::thread::Thread>,
}

impl Gate {
    /// Wakes the writer if it is holding a group open for events expected soon. Called only when
    /// the last announced event has arrived (or its intent was dropped), or an unannounced one
    /// did: each wake-up is a futex call here and a context switch on the writer, and a loaded CA
    /// holds every group open until its window ends anyway, so an arrival that leaves other
    /// announced events outstanding does not wake it (it takes the event with the rest).
    fn wake_writer(&self) {
        if self.gathering.load(Ordering::SeqCst)
            && let Some(t) = self.writer.get()
        {
            t.unpark();
        }
    }
}

/// Announces an audit event that is on its way: an issuance takes one when it starts (before the
/// ~100 µs of CSR checks and signing) and hands it to [`AuditLog::record_with`]. While intents
/// are outstanding the writer holds its group open (up to a short window) instead of paying a
/// flush for a group it knows is about to grow. Dropping an unused intent is fine.
///
/// An intent is released once its event is in the writer's queue (the writer drains the queue
/// before it looks at the count), and the release of the last outstanding one wakes a writer
/// that holds its group open.
pub struct Intent {
    gate: Option<Arc<Gate>>,
}

impl Drop for Intent {
    fn drop(&mut self) {
        if let Some(g) = self.gate.take()
            && g.outstanding.fetch_sub(1, Ordering::SeqCst) == 1
        {
            g.wake_writer();
        }
    }
}

/// A subscriber's position: replays from the store, then follows the live feed, never skipping
/// or repeating a record.
pub struct Subscription {
    store: Arc<dyn Store>,
    live: broadcast::Receiver<Arc<Committed>>,
    next: u64,
    backlog: std::collections::VecDeque<AuditRecord>,
    caught_up: bool,
}

impl AuditLog {
    /// Starts the writer task over `store`, continuing its chain.
    pub fn start(store: Arc<dyn Store>) -> Result<Self, AuditError> {
        let head = store.audit_head()?;
        let (tx, rx) = mpsc::channel(8 * MAX_GROUP);
        // A replicated store publishes every replica's commits itself, in seq order; the writer
        // then publishes nothing (its own commits arrive through the store's feed too).
        let feed = store.commit_feed();
        let publish = feed.is_none();
        let live = feed.unwrap_or_else(|| broadcast::channel(LIVE_BUFFER).0);
        let gate = Arc::new(Gate::default());
        let flusher = Arc::new(Flusher {
            store: store.clone(),
            live: live.clone(),
            publish,
            in_flight: AtomicUsize::new(0),
        });
        let (sealed_tx, sealed_rx) = std::sync::mpsc::channel::<Sealed>();
        // The syncer flushes committed groups while the writer gathers and commits the next one;
        // it stops once the writer has stopped and every group handed to it is answered.
        let syncer = flusher.clone();
        std::thread::Builder::new()
            .name("lanyard-audit-sync".into())
            .spawn(move || {
                while let Ok(first) = sealed_rx.recv() {
                    let mut batch = vec![first];
                    batch.extend(sealed_rx.try_iter());
                    let n = batch.len();
                    syncer.finish(batch);
                    syncer.in_flight.fetch_sub(n, Ordering::SeqCst);
                }
            })
            .map_err(|e| {
                AuditError::Store(crate::store::StoreError::Backend(format!(
                    "cannot start the audit syncer: {e}"
                )))
            })?;
        let writer = Writer {
            store: store.clone(),
            flusher,
            sealed: sealed_tx,
            alone: false,
            gate: gate.clone(),
            next_seq: head.map_or(1, |(seq, _)| seq + 1),
            prev_hash: head.map_or(GENESIS_HASH, |(_, h)| h),
            last_ms: 0,
            recent: [1; RECENT_GROUPS],
            recent_at: 0,
            lone_commits: 0,
        };
        // The writer is a plain thread, not a task that hands each group to the blocking pool:
        // the commit and its fsync block anyway, and this saves two thread hand-offs per group
        // (task → blocking thread → task). A lone event skips even this thread: its caller
        // commits it (see `commit_if_alone`). A lone group is flushed on the writer itself; only
        // a loaded writer hands its flushes to the syncer. It stops once every `AuditLog`
        // handle is dropped.
        let writer = Arc::new(Mutex::new(writer));
        let thread_writer = writer.clone();
        let thread = std::thread::Builder::new()
            .name("lanyard-audit".into())
            .spawn(move || Writer::run(&thread_writer, rx))
            .map_err(|e| {
                AuditError::Store(crate::store::StoreError::Backend(format!(
                    "cannot start the audit writer: {e}"
                )))
            })?;
        let _ = gate.writer.set(thread.thread().clone());
        Ok(Self {
            tx,
            live,
            store,
            gate,
            writer,
            inline: publish,
        })
    }

    /// Announces an event that will be recorded soon (see [`Intent`]).
    pub fn intent(&self) -> Intent {
        self.gate.outstanding.fetch_add(1, Ordering::SeqCst);
        Intent {
            gate: Some(self.gate.clone()),
        }
    }

    /// [`AuditLog::record`] for an event announced by `intent`.
    pub async fn record_with(
        &self,
        intent: Option<Intent>,
        event: Event,
        writes: Vec<Write>,
    ) -> Result<AuditRecord, AuditError> {
        let (done, rx) = oneshot::channel();
        let pending = Pending {
            event,
            writes,
            done,
        };
        let (intent, pending) = match self.commit_if_alone(intent, pending) {
            Ok(()) => return rx.await.map_err(|_| AuditError::Closed)?,
            Err(back) => back,
        };
        self.tx
            .send(pending)
            .await
            .map_err(|_| AuditError::Closed)?;
        // The event is queued: its intent is fulfilled (dropping it wakes the writer if it was
        // the last one outstanding). An unannounced event wakes it only when none is announced;
        // otherwise the writer is waiting for those and takes this one with them. A full group
        // is committed at once either way.
        let unannounced = match intent {
            Some(i) => {
                drop(i);
                false
            }
            None => self.gate.outstanding.load(Ordering::SeqCst) == 0,
        };
        if unannounced || self.tx.max_capacity() - self.tx.capacity() >= MAX_GROUP {
            self.gate.wake_writer();
        }
        rx.await.map_err(|_| AuditError::Closed)?
    }

    /// Commits `p` right here, on the caller's thread, if it is alone: a local store, no other
    /// event announced, none queued, the writer not busy and its recent groups lone too.
    /// Waking the writer's thread for a lone event, and the caller's task back after, costs
    /// more than the commit itself at a fleet's rates (design decision 126). The commit blocks
    /// this thread for a few sled writes and one `fdatasync`, one caller at a time (the
    /// writer's lock); a loaded CA, whose events are announced or queued, hands them to the
    /// writer's thread as before. Otherwise gives `intent` and `p` back.
    #[allow(clippy::result_large_err)]
    fn commit_if_alone(
        &self,
        intent: Option<Intent>,
        p: Pending,
    ) -> Result<(), (Option<Intent>, Pending)> {
        let own = usize::from(intent.is_some());
        if !self.inline
            || self.gate.outstanding.load(Ordering::SeqCst) != own
            || self.tx.capacity() != self.tx.max_capacity()
        {
            return Err((intent, p));
        }
        let Ok(mut writer) = self.writer.try_lock() else {
            return Err((intent, p));
        };
        // Only while the writer's recent groups were lone too: under load an event that finds
        // the queue empty for a moment is still better taken into the next group than let to
        // hold a runtime thread through an fsync.
        if writer.expected_size() > 1 {
            drop(writer);
            return Err((intent, p));
        }
        drop(intent);
        writer.commit_lone(p);
        Ok(())
    }

    /// Records `event` together with `writes`; returns once both are durable.
    pub async fn record(
        &self,
        event: Event,
        writes: Vec<Write>,
    ) -> Result<AuditRecord, AuditError> {
        self.record_with(None, event, writes).await
    }

    /// (group commits, events committed) so far by every audit log in this process. Their ratio
    /// is how many events share one transaction and one fsync (for benchmarks and metrics).
    pub fn commit_counters() -> (u64, u64) {
        (
            GROUPS.load(Ordering::Relaxed),
            EVENTS.load(Ordering::Relaxed),
        )
    }

    /// Live feed of committed records (may lag; see [`Subscription`] for a lossless reader).
    pub fn live(&self) -> broadcast::Receiver<Arc<Committed>> {
        self.live.subscribe()
    }

    /// A lossless reader starting at `from_seq` (0 or 1: the beginning).
    pub fn subscribe(&self, from_seq: u64) -> Subscription {
        Subscription {
            store: self.store.clone(),
            live: self.live.subscribe(),
            next: from_seq.max(1),
            backlog: Default::default(),
            caught_up: false,
        }
    }

    /// The store behind the log.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }
}

impl Subscription {
    /// The next record in order. With `follow = false`, `None` once the stored log is exhausted;
    /// with `follow = true`, waits for new records (`None` only when the log closes).
    pub async fn next(&mut self, follow: bool) -> Result<Option<AuditRecord>, AuditError> {
        loop {
            if let Some(r) = self.backlog.pop_front() {
                self.next = r.seq + 1;
                return Ok(Some(r));
            }
            if !self.caught_up {
                // A replicated store reads the log over the network: off the async workers.
                let (store, from) = (self.store.clone(), self.next);
                let page = tokio::task::spawn_blocking(move || store.read_audit(from, REPLAY_PAGE))
                    .await
                    .map_err(|_| AuditError::Closed)??;
                if page.len() < REPLAY_PAGE {
                    self.caught_up = true;
                }
                if !page.is_empty() {
                    self.backlog.extend(page);
                    continue;
                }
            }
            if !follow {
                return Ok(None);
            }
            match self.live.recv().await {
                Ok(c) if c.record.seq < self.next => continue,
                Ok(c) if c.record.seq == self.next => {
                    self.next += 1;
                    return Ok(Some(c.record.clone()));
                }
                // Something committed between our last store read and the live feed: read the
                // gap from the store.
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => self.caught_up = false,
                Err(broadcast::error::RecvError::Closed) => return Ok(None),
            }
        }
    }
}

struct Writer {
    store: Arc<dyn Store>,
    /// Makes committed groups durable and answers them (here, or on the syncer thread).
    flusher: Arc<Flusher>,
    /// Committed groups for the syncer thread.
    sealed: std::sync::mpsc::Sender<Sealed>,
    /// Nothing was queued when the current group was closed.
    alone: bool,
    gate: Arc<Gate>,
    next_seq: u64,
    prev_hash: [u8; 32],
    last_ms: i64,
    /// Sizes of the last groups (a ring).
    recent: [usize; RECENT_GROUPS],
    recent_at: usize,
    /// Events its callers committed themselves (see `AuditLog::commit_if_alone`).
    lone_commits: u64,
}

impl Writer {
    fn run(writer: &Mutex<Writer>, mut rx: mpsc::Receiver<Pending>) {
        let mut group = Vec::with_capacity(MAX_GROUP);
        // Block for the first event, then take what else is queued or announced: that is the group.
        while let Some(first) = rx.blocking_recv() {
            let mut this = writer.lock().unwrap_or_else(|p| p.into_inner());
            let deadline = Instant::now() + GATHER_WINDOW;
            take(&mut group, first);
            this.gather(&mut rx, &mut group, deadline);
            // Announced events alone do not make the writer loaded: at a fleet's rates (tens of
            // renewals a second) some renewal has nearly always announced its event, and handing
            // those groups to the syncer cost a thread hand-off each and ~7 KB more CA memory
            // per connected agent at 1,000 agents (sled's per-thread state on a second thread).
            this.alone = rx.is_empty();
            this.remember_size(group.len());
            this.commit_group(std::mem::take(&mut group));
        }
    }

    /// The next group's size, guessed from the recent ones: the largest of them.
    fn expected_size(&self) -> usize {
        self.recent
            .iter()
            .copied()
            .max()
            .unwrap_or(1)
            .min(MAX_GROUP)
    }

    /// Notes a group's size for the next guess (see [`Writer::expected_size`]).
    fn remember_size(&mut self, n: usize) {
        self.recent[self.recent_at] = n;
        self.recent_at = (self.recent_at + 1) % RECENT_GROUPS;
    }

    /// Commits an event that is alone (see [`AuditLog::commit_if_alone`]) as a group of one, and
    /// answers it once durable: here, unless the syncer is still flushing an earlier group.
    fn commit_lone(&mut self, p: Pending) {
        self.lone_commits += 1;
        self.alone = true;
        self.remember_size(1);
        self.commit_group(vec![p]);
    }

    /// Adds queued events to `group`; while more are expected (see [`GATHER_WINDOW`]), waits for
    /// them until `deadline`.
    fn gather(
        &self,
        rx: &mut mpsc::Receiver<Pending>,
        group: &mut Vec<Pending>,
        deadline: Instant,
    ) {
        let expected = self.expected_size();
        let more_expected = |group: &Vec<Pending>| {
            group.len() < expected || self.gate.outstanding.load(Ordering::SeqCst) > 0
        };
        loop {
            while group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(p) => take(group, p),
                    Err(_) => break,
                }
            }
            let now = Instant::now();
            if group.len() >= MAX_GROUP || now >= deadline || !more_expected(group) {
                return;
            }
            // Announce the wait, then look once more: a sender that enqueued before seeing the
            // flag is caught by this `try_recv`, one after it unparks us (park keeps the token).
            self.gate.gathering.store(true, Ordering::SeqCst);
            match rx.try_recv() {
                Ok(p) => {
                    self.gate.gathering.store(false, Ordering::SeqCst);
                    take(group, p);
                    continue;
                }
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    self.gate.gathering.store(false, Ordering::SeqCst);
                    return;
                }
                Err(mpsc::error::TryRecvError::Empty) => {}
            }
            if more_expected(group) {
                std::thread::park_timeout(deadline - now);
            }
            self.gate.gathering.store(false, Ordering::SeqCst);
        }
    }

    /// Commits a group, split where it exceeds what one store commit may write.
    fn commit_group(&mut self, group: Vec<Pending>) {
        let budget = self.store.max_commit_ops().max(2);
        let mut chunk = Vec::new();
        // One op for the chain head, one per record, one per write.
        let mut ops = 1;
        for p in group {
            let n = 1 + p.writes.len();
            if !chunk.is_empty() && ops + n > budget {
                self.commit_chunk(std::mem::take(&mut chunk));
                ops = 1;
            }
            ops += n;
            chunk.push(p);
        }
        if !chunk.is_empty() {
            self.commit_chunk(chunk);
        }
    }

    /// Sequences `group` from the current head and commits it. When another replica appended
    /// first, re-reads the head and re-sequences; when some events' guards failed, fails only
    /// those events and commits the rest.
    fn commit_chunk(&mut self, mut group: Vec<Pending>) {
        let mut head_retries = 0;
        loop {
            if group.is_empty() {
                return;
            }
            let seq = self.sequence(&group);
            let started = Instant::now();
            match self.store.commit(&seq.records, &seq.writes) {
                Ok(()) => {
                    if let Some(last) = seq.records.last() {
                        self.next_seq = last.seq + 1;
                        self.prev_hash = last.hash;
                    }
                    self.last_ms = seq.time_ms;
                    self.seal(Sealed {
                        group,
                        records: seq.records,
                        revocations: seq.revocations,
                        access: seq.access,
                        committed_in: started.elapsed(),
                    });
                    return;
                }
                Err(StoreError::HeadMoved) if head_retries < MAX_HEAD_RETRIES => {
                    head_retries += 1;
                    self.reread_head();
                }
                Err(StoreError::GuardFailed { writes }) => {
                    // Fail only the events whose guards failed; re-sequence the rest.
                    let mut losers: Vec<usize> = writes
                        .iter()
                        .filter_map(|w| seq.owners.get(*w).copied())
                        .collect();
                    losers.sort_unstable();
                    losers.dedup();
                    if losers.is_empty() {
                        self.fail(group, &StoreError::GuardFailed { writes });
                        return;
                    }
                    for i in losers.into_iter().rev() {
                        let p = group.remove(i);
                        let _ = p.done.send(Err(AuditError::Conflict));
                    }
                }
                Err(e) => {
                    self.fail(group, &e);
                    return;
                }
            }
        }
    }

    /// Hands a committed group on to be flushed. Under load the flush (sled's write-out and an
    /// `fdatasync`, 0.1 to 4 ms on this kind of disk) runs on the syncer thread while this thread
    /// gathers and commits the next group, so a group no longer waits for the previous group's
    /// fsync before it even starts gathering. A group alone (nothing queued or announced, no
    /// flush in flight) is flushed right here, as before: a lone request has no thread hand-off
    /// to spare. Either way a group is answered only by a flush that started after its commit.
    fn seal(&mut self, sealed: Sealed) {
        if self.alone && self.flusher.in_flight.load(Ordering::SeqCst) == 0 {
            if !self.flusher.finish(vec![sealed]) {
                self.reread_head();
            }
            return;
        }
        self.flusher.in_flight.fetch_add(1, Ordering::SeqCst);
        if let Err(std::sync::mpsc::SendError(sealed)) = self.sealed.send(sealed) {
            // The syncer is gone (it cannot be while the writer runs): flush here instead.
            self.flusher.in_flight.fetch_sub(1, Ordering::SeqCst);
            if !self.flusher.finish(vec![sealed]) {
                self.reread_head();
            }
        }
    }

    /// Numbers and chains `group` from the writer's head.
    fn sequence(&self, group: &[Pending]) -> Sequenced {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        // Time never goes backwards inside this writer's part of the log, even if the wall
        // clock does.
        let time_ms = now_ms.max(self.last_ms);
        let mut out = Sequenced {
            records: Vec::with_capacity(group.len()),
            writes: Vec::with_capacity(group.len() * 2),
            owners: Vec::with_capacity(group.len() * 2),
            revocations: Vec::with_capacity(group.len()),
            access: Vec::with_capacity(group.len()),
            time_ms,
        };
        let (mut seq, mut prev) = (self.next_seq, self.prev_hash);
        for (i, p) in group.iter().enumerate() {
            let e = &p.event;
            let mut rec = AuditRecord {
                v: RECORD_VERSION,
                seq,
                time_ms,
                kind: e.kind.map_or("unknown", |k| k.as_str()).to_string(),
                actor: e.actor.clone(),
                subject: e.subject.clone(),
                serial: e.serial.clone(),
                roles: e.roles.clone(),
                not_after: e.not_after,
                reason: e.reason.clone(),
                claimed: e.claimed.clone(),
                prev_hash: prev,
                hash: [0; 32],
            };
            rec.hash = compute_hash(&rec);
            prev = rec.hash;
            let (mut revs, mut access) = (Vec::new(), Vec::new());
            for w in &p.writes {
                let mut w = w.clone();
                match &mut w {
                    Write::PutRevocation(r) => {
                        r.rev = seq;
                        revs.push(r.clone());
                    }
                    Write::PutAccess(a) => access.push(a.clone()),
                    _ => {}
                }
                out.writes.push(w);
                out.owners.push(i);
            }
            out.revocations.push(revs);
            out.access.push(access);
            out.records.push(rec);
            seq += 1;
        }
        out
    }

    /// Continues the chain from what is stored (after a failure, or another replica's append).
    fn reread_head(&mut self) {
        match self.store.audit_head() {
            Ok(head) => {
                self.next_seq = head.map_or(1, |(s, _)| s + 1);
                self.prev_hash = head.map_or(GENESIS_HASH, |(_, h)| h);
            }
            Err(e) => warn!(error = %e, "cannot re-read audit head"),
        }
    }

    /// Answers every event of `group` with the failure; nothing was acknowledged.
    fn fail(&mut self, group: Vec<Pending>, e: &StoreError) {
        // Re-read the head: a failed flush may still have left the records in the tree, and
        // the chain must continue from what is stored.
        error!(error = %e, events = group.len(), "audit commit failed");
        self.reread_head();
        let msg = e.to_string();
        for p in group {
            let _ = p
                .done
                .send(Err(AuditError::Store(StoreError::Backend(msg.clone()))));
        }
    }
}

/// A committed group waiting for the flush that makes it durable.
struct Sealed {
    group: Vec<Pending>,
    records: Vec<AuditRecord>,
    revocations: Vec<Vec<RevocationRecord>>,
    access: Vec<Vec<AccessRecord>>,
    /// How long its store commit took.
    committed_in: Duration,
}

/// Flushes committed groups and answers their callers (publishing to subscribers first).
struct Flusher {
    store: Arc<dyn Store>,
    live: broadcast::Sender<Arc<Committed>>,
    /// Whether the log publishes its commits (false when the store does, see `commit_feed`).
    publish: bool,
    /// Groups handed to the syncer thread and not yet answered.
    in_flight: AtomicUsize,
}

impl Flusher {
    /// One flush for every group of `batch` (all committed before it starts), then the answers,
    /// in commit order. Returns whether the flush succeeded.
    fn finish(&self, batch: Vec<Sealed>) -> bool {
        let started = Instant::now();
        let flushed = self.store.flush();
        let flushed_in = started.elapsed();
        let events: usize = batch.iter().map(|s| s.group.len()).sum();
        match flushed {
            Ok(()) => {
                GROUPS.fetch_add(1, Ordering::Relaxed);
                EVENTS.fetch_add(events as u64, Ordering::Relaxed);
                for s in batch {
                    crate::metrics::ca().audit_commit(
                        s.group.len(),
                        s.committed_in + flushed_in,
                        flushed_in,
                    );
                    let parts = s
                        .group
                        .into_iter()
                        .zip(s.records)
                        .zip(s.revocations)
                        .zip(s.access);
                    for (((p, rec), revocations), access) in parts {
                        // Subscribers get their copy first, then the caller gets the record.
                        if self.publish && self.live.receiver_count() > 0 {
                            let _ = self.live.send(Arc::new(Committed {
                                record: rec.clone(),
                                revocations,
                                access,
                            }));
                        }
                        let _ = p.done.send(Ok(rec));
                    }
                }
                true
            }
            Err(e) => {
                // Nothing was acknowledged. The records stay in the store (the writer's chain
                // continues from them, as from what is stored after any failed flush).
                error!(error = %e, events, "audit flush failed");
                let msg = e.to_string();
                for p in batch.into_iter().flat_map(|s| s.group) {
                    let _ = p
                        .done
                        .send(Err(AuditError::Store(StoreError::Backend(msg.clone()))));
                }
                false
            }
        }
    }
}

/// A group numbered and chained, ready to commit.
struct Sequenced {
    records: Vec<AuditRecord>,
    writes: Vec<Write>,
    /// For each write, the index of the event it belongs to.
    owners: Vec<usize>,
    revocations: Vec<Vec<RevocationRecord>>,
    access: Vec<Vec<AccessRecord>>,
    time_ms: i64,
}

/// Adds `p` to the group.
fn take(group: &mut Vec<Pending>, p: Pending) {
    group.push(p);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::audit::Kind;
    use crate::store::SledStore;

    fn log() -> (tempfile::TempDir, AuditLog) {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        (dir, AuditLog::start(store).unwrap())
    }

    fn event(n: u32) -> Event {
        Event::new(Kind::Renewed, format!("spiffe://example.org/w{n}"))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn announced_events_share_one_group() {
        let (_dir, log) = log();
        let (a, b, c) = (log.intent(), log.intent(), log.intent());
        let (ra, rb, rc) = tokio::join!(
            log.record_with(Some(a), event(1), vec![]),
            log.record_with(Some(b), event(2), vec![]),
            log.record_with(Some(c), event(3), vec![]),
        );
        let (ra, rb, rc) = (ra.unwrap(), rb.unwrap(), rc.unwrap());
        // A group shares one commit time and consecutive seqs.
        assert_eq!((ra.time_ms, rb.time_ms), (rc.time_ms, rc.time_ms));
        let mut seqs = [ra.seq, rb.seq, rc.seq];
        seqs.sort_unstable();
        assert_eq!(seqs, [1, 2, 3]);
        assert_eq!(log.gate.outstanding.load(Ordering::SeqCst), 0);
    }

    /// Under load groups are flushed on the syncer thread while the next one commits: every
    /// caller still gets its own record, durable in the store, the chain is whole, and a live
    /// subscriber sees every record once, in seq order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_groups_are_answered_in_order_and_chained() {
        let (_dir, log) = log();
        let mut live = log.live();
        let rounds = 8;
        let writers = 48;
        let tasks: Vec<_> = (0..writers)
            .map(|w| {
                let log = log.clone();
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    for r in 0..rounds {
                        // Half announce their event first, as an issuance does.
                        let intent = (w % 2 == 0).then(|| log.intent());
                        tokio::task::yield_now().await;
                        let rec = log
                            .record_with(intent, event(w * rounds + r), vec![])
                            .await
                            .unwrap();
                        assert_eq!(
                            rec.actor,
                            format!("spiffe://example.org/w{}", w * rounds + r)
                        );
                        got.push(rec.seq);
                    }
                    got
                })
            })
            .collect();
        let mut seqs = Vec::new();
        for t in tasks {
            seqs.extend(t.await.unwrap());
        }
        seqs.sort_unstable();
        let total = u64::from(writers * rounds);
        assert_eq!(seqs, (1..=total).collect::<Vec<_>>());
        let stored = log.store().read_audit(1, 10_000).unwrap();
        assert_eq!(stored.len() as u64, total);
        crate::audit::chain::verify_chain(&stored, 1, GENESIS_HASH).unwrap();
        for want in 1..=total {
            assert_eq!(live.recv().await.unwrap().record.seq, want);
        }
        assert_eq!(log.gate.outstanding.load(Ordering::SeqCst), 0);
    }

    /// An event alone is committed by its caller, durable and chained like any other; one
    /// announced behind another, or arriving while the writer's recent groups held several,
    /// goes to the writer's thread.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lone_event_is_committed_by_its_caller() {
        let (_dir, log) = log();
        let lone = |log: &AuditLog| log.writer.lock().unwrap().lone_commits;
        let first = log.intent();
        let r = log
            .record_with(Some(first), event(1), vec![])
            .await
            .unwrap();
        assert_eq!((r.seq, lone(&log)), (1, 1));
        // Another event is announced: this one is left to the writer, which waits for it.
        let other = log.intent();
        let r = log.record(event(2), vec![]).await.unwrap();
        assert_eq!((r.seq, lone(&log)), (2, 1));
        drop(other);
        let r = log.record(event(3), vec![]).await.unwrap();
        assert_eq!((r.seq, lone(&log)), (3, 2));
        // A group of two: the next events go to the writer until its recent groups are lone.
        let (a, b) = (log.intent(), log.intent());
        let (ra, rb) = tokio::join!(
            log.record_with(Some(a), event(4), vec![]),
            log.record_with(Some(b), event(5), vec![]),
        );
        assert_eq!(ra.unwrap().time_ms, rb.unwrap().time_ms);
        for n in 6..6 + RECENT_GROUPS as u32 {
            log.record(event(n), vec![]).await.unwrap();
        }
        assert_eq!(lone(&log), 2);
        let r = log.record(event(99), vec![]).await.unwrap();
        assert_eq!((r.seq, lone(&log)), (6 + RECENT_GROUPS as u64, 3));
        let stored = log.store().read_audit(1, 100).unwrap();
        assert_eq!(stored.len() as u64, r.seq);
        crate::audit::chain::verify_chain(&stored, 1, GENESIS_HASH).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unused_intents_never_block_a_commit() {
        let (_dir, log) = log();
        // Intents that are never fulfilled delay a group by at most the gather window.
        let held = log.intent();
        let start = Instant::now();
        for n in 0..3 {
            tokio::time::timeout(Duration::from_secs(5), log.record(event(n), vec![]))
                .await
                .expect("commits despite the outstanding intent")
                .unwrap();
        }
        assert!(start.elapsed() < Duration::from_secs(5));
        // Dropping it (a request that failed before recording) releases the writer at once.
        let waiting = tokio::spawn({
            let log = log.clone();
            async move { log.record(event(9), vec![]).await }
        });
        drop(held);
        let rec = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(rec.seq, 4);
        assert_eq!(log.gate.outstanding.load(Ordering::SeqCst), 0);
    }
}
