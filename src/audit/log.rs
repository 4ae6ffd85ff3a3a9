//! The single writer: group commit of audit records and the state changes they describe.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{error, warn};

use super::chain::{GENESIS_HASH, compute_hash};
use super::{AuditError, Event};
use crate::store::{AuditRecord, RECORD_VERSION, RevocationRecord, Store, Write};

/// Most events committed in one transaction and one fsync.
const MAX_GROUP: usize = 1024;
/// Records kept for live subscribers; one that falls further behind is fed from the store.
const LIVE_BUFFER: usize = 4096;
/// Records read from the store per page while replaying.
const REPLAY_PAGE: usize = 512;

/// A record that is durable, with the revocations it carried (for revocation watchers).
#[derive(Debug, Clone)]
pub struct Committed {
    /// The audit record.
    pub record: AuditRecord,
    /// Revocation entries written with it, their `rev` set to the record's seq.
    pub revocations: Vec<RevocationRecord>,
}

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
        let (live, _) = broadcast::channel(LIVE_BUFFER);
        let writer = Writer {
            store: store.clone(),
            live: live.clone(),
            next_seq: head.map_or(1, |(seq, _)| seq + 1),
            prev_hash: head.map_or(GENESIS_HASH, |(_, h)| h),
            last_ms: 0,
        };
        // The writer is a plain thread, not a task that hands each group to the blocking pool:
        // the commit and its fsync block anyway, and this saves two thread hand-offs per group
        // (task → blocking thread → task), which is most of the non-fsync latency of a lone
        // issuance. It stops once every `AuditLog` handle is dropped.
        std::thread::Builder::new()
            .name("lanyard-audit".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| {
                AuditError::Store(crate::store::StoreError::Backend(format!(
                    "cannot start the audit writer: {e}"
                )))
            })?;
        Ok(Self { tx, live, store })
    }

    /// Records `event` together with `writes`; returns once both are durable.
    pub async fn record(
        &self,
        event: Event,
        writes: Vec<Write>,
    ) -> Result<AuditRecord, AuditError> {
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Pending {
                event,
                writes,
                done,
            })
            .await
            .map_err(|_| AuditError::Closed)?;
        rx.await.map_err(|_| AuditError::Closed)?
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
                let page = self.store.read_audit(self.next, REPLAY_PAGE)?;
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
    live: broadcast::Sender<Arc<Committed>>,
    next_seq: u64,
    prev_hash: [u8; 32],
    last_ms: i64,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Pending>) {
        let mut group = Vec::with_capacity(MAX_GROUP);
        // Block for the first event, then take whatever else is already queued: that is the group.
        while let Some(first) = rx.blocking_recv() {
            group.push(first);
            while group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(p) => group.push(p),
                    Err(_) => break,
                }
            }
            self.commit_group(std::mem::take(&mut group));
        }
    }

    fn commit_group(&mut self, group: Vec<Pending>) {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        // Time never goes backwards inside the log, even if the wall clock does.
        let time_ms = now_ms.max(self.last_ms);
        let mut records = Vec::with_capacity(group.len());
        let mut writes = Vec::with_capacity(group.len() * 2);
        let mut revs = Vec::with_capacity(group.len());
        let mut waiters = Vec::with_capacity(group.len());
        let (mut seq, mut prev) = (self.next_seq, self.prev_hash);
        for p in group {
            let Pending {
                event: e,
                writes: ws,
                done,
            } = p;
            let mut rec = AuditRecord {
                v: RECORD_VERSION,
                seq,
                time_ms,
                kind: e.kind.map_or("unknown", |k| k.as_str()).to_string(),
                actor: e.actor,
                subject: e.subject,
                serial: e.serial,
                roles: e.roles,
                not_after: e.not_after,
                reason: e.reason,
                prev_hash: prev,
                hash: [0; 32],
            };
            rec.hash = compute_hash(&rec);
            prev = rec.hash;
            let mut mine = Vec::new();
            for mut w in ws {
                if let Write::PutRevocation(r) = &mut w {
                    r.rev = seq;
                    mine.push(r.clone());
                }
                writes.push(w);
            }
            revs.push(mine);
            records.push(rec);
            waiters.push(done);
            seq += 1;
        }
        let result = self
            .store
            .commit(&records, &writes)
            .and_then(|()| self.store.flush());
        match result {
            Ok(()) => {
                self.next_seq = seq;
                self.prev_hash = prev;
                self.last_ms = time_ms;
                for ((done, rec), revocations) in waiters.into_iter().zip(records).zip(revs) {
                    // Subscribers get their copy first, then the caller gets the record.
                    if self.live.receiver_count() > 0 {
                        let _ = self.live.send(Arc::new(Committed {
                            record: rec.clone(),
                            revocations,
                        }));
                    }
                    let _ = done.send(Ok(rec));
                }
            }
            Err(e) => {
                // Nothing is acknowledged. Re-read the head: a failed flush may still have left
                // the records in the tree, and the chain must continue from what is stored.
                error!(error = %e, events = waiters.len(), "audit commit failed");
                match self.store.audit_head() {
                    Ok(head) => {
                        self.next_seq = head.map_or(1, |(s, _)| s + 1);
                        self.prev_hash = head.map_or(GENESIS_HASH, |(_, h)| h);
                    }
                    Err(e) => warn!(error = %e, "cannot re-read audit head"),
                }
                let msg = e.to_string();
                for done in waiters {
                    let _ = done.send(Err(AuditError::Store(crate::store::StoreError::Backend(
                        msg.clone(),
                    ))));
                }
            }
        }
    }
}
